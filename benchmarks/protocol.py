"""The spatial-reconstruction benchmark of ``../shared/BENCHMARK.md`` as a command.

Run from the repository root of a checkout::

    python -m benchmarks.protocol data_dir=../shared/data tasks=impute,transfer \\
        methods=dpvae,knn_regression,pca_mds seeds=0,1,2 datasets=all out=bench_out threads=1
    python -m benchmarks.protocol data_dir=../shared/data tasks=anchored \\
        methods=dpvae,dpvae_zeroshot,dpvae_anchors,knn_regression out=bench_out/anchored threads=1

The keys, their defaults and what they mean are in ``benchmarks/conf/protocol.yaml`` (``--help``
prints them); :func:`config_from` checks the values.

For every (task, unit, method, seed) the method gets a reference AnnData (expression and
``obsm['spatial']``) and a query AnnData (expression only: no coordinates, no ``obs`` columns, no
``obsm``, neutral cell names) in a fresh child process, which gives a wall-clock timeout and an
honest peak-memory figure. dp-VAE is called only through :func:`dpvae.api.fit_predict` (imported in
that child process), the comparators are :mod:`benchmarks.comparators`. The parent scores the
returned coordinates with :func:`dpvae.metrics.score_coordinates`. A method that fails, is not
installed or times out is recorded as such; the run goes on.

The ``anchored`` task (a transfer pair A -> B with a fraction of B's cells given with their
coordinates: the anchors) gives every method the anchors as its reference and the rest of B as
the query; the dpvae variants also get section A: ``dpvae`` trains on A and fine-tunes on the
anchors (:meth:`dpvae.api.Model.fine_tune`), ``dpvae_zeroshot`` trains on A and places the query
against the anchors, ``dpvae_through`` trains on A and places the query through A's cells into
the anchors' frame (``anchors=``, :mod:`dpvae.anchors`), ``dpvae_anchors`` trains on the anchors
alone. The A-trained model of a
(pair, seed) is trained once and kept in ``cache`` (default ``OUT/cache``); a run that reuses it
reports its recorded training seconds on top of its own (``reused_s``), so every wall time is the
method's whole cost. A method may return ``(coordinates, radius)``: a per-cell radius meant to
hold the true position with 90% probability, scored by ``coverage90``, ``radius_spearman`` and
``radius_median`` (cell spacings).

Outputs in ``out``: ``results.csv`` (one row per run, written as runs finish), ``results.md``
(one row per task, unit and method: mean ± sd over seeds), ``figures/*.png`` (true versus
predicted query coordinates, seed 0, per unit) and ``predictions/*.npy``.

On a shared machine ``threads=1`` avoids OpenBLAS's busy-waiting threads slowing small problems
down many times over.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import multiprocessing as mp
import os
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from omegaconf import DictConfig

from dpvae.errors import ConfigError, DPVAEError

if TYPE_CHECKING:  # anndata is imported where it is used: --help stays light
    import anndata as ad

__all__ = [
    "ANCHOR_DIST_PEARSON",
    "DATASETS",
    "DEFAULT_PAIRS",
    "METHODS",
    "BenchmarkConfig",
    "RunResult",
    "compose",
    "config_from",
    "hygiene",
    "hygiene_pair",
    "anchored_split",
    "impute_split",
    "main",
    "method_inputs",
    "parse_args",
    "run_benchmark",
    "run_method",
    "summarize",
    "work",
]

#: Dataset ids (as in ANCHORS.md) -> file names in ``data_dir``.
DATASETS: dict[str, str] = {
    "bdtnp_3d": "bdtnp_drosophila_embryo_3d.h5ad",
    "dlpfc_151673": "dlpfc_visium_151673.h5ad",
    "dlpfc_151674": "dlpfc_visium_151674.h5ad",
    "merfish_bregma0.21": "merfish_hypothalamus_animal1_bregma0.21.h5ad",
    "osmfish_sscortex": "osmfish_mouse_sscortex.h5ad",
    "st_breast_cancer_layer1": "st_breast_cancer_layer1.h5ad",
    "st_breast_cancer_layer2": "st_breast_cancer_layer2.h5ad",
    "st_breast_cancer_layer3": "st_breast_cancer_layer3.h5ad",
    "st_breast_cancer_layer4": "st_breast_cancer_layer4.h5ad",
    "starmap3d_visp": "starmap3d_mouse_visp.h5ad",
}

#: The protocol's dev pairs for transfer (reference -> query).
DEFAULT_PAIRS: tuple[tuple[str, str], ...] = (
    ("dlpfc_151673", "dlpfc_151674"),
    ("st_breast_cancer_layer1", "st_breast_cancer_layer2"),
)

#: Methods the command knows. ``dpvae`` calls :func:`dpvae.api.fit_predict`; the others are in
#: :mod:`benchmarks.comparators` (celery, tangram, novosparc are an optional extra).
METHODS: tuple[str, ...] = (
    "dpvae",
    "knn_regression",
    "pca_mds",
    "celery",
    "tangram",
    "novosparc",
    "dpvae_cli",
    "dpvae_zeroshot",
    "dpvae_anchors",
    "dpvae_through",
)

#: Methods of the anchored task only (skipped on impute and transfer units). On anchored units
#: ``dpvae`` is the fine-tuned model: trained on section A, fine-tuned on the anchors.
ANCHORED_ONLY: frozenset[str] = frozenset({"dpvae_zeroshot", "dpvae_anchors", "dpvae_through"})

#: the fine-tuned dpvae and the route through A's cells it may choose (not an "other" to it)
ROUTES: frozenset[str] = frozenset({"dpvae", "dpvae_through"})

#: dpvae methods of the anchored task that start from the model trained on section A.
FROM_SOURCE: frozenset[str] = frozenset({"dpvae", "dpvae_zeroshot", "dpvae_through"})

#: Small-data settings of dpvae trained on the anchors alone (as few as 13 cells): every cell
#: trains (no held-out slice), the datamodule's minimum cell count of the fine-tuning profile,
#: and every gene (the 2000 most variable genes of 13-25 breast-cancer anchors left some query
#: spots with no expression at all, which dpvae cannot place).
ANCHORS_ONLY_OVERRIDES: tuple[str, ...] = (
    "data.val_fraction=0",
    "data.min_cells=3",
    "data.n_genes=0",
)

#: The checkout (``train.py``, which dpvae_cli runs).
CHECKOUT = Path(__file__).resolve().parents[1]

#: Methods of the impute and transfer tasks only (skipped on anchored units).
NOT_ANCHORED: frozenset[str] = frozenset({"dpvae_cli"})

#: Methods whose output frame is arbitrary: scored with rotation-invariant scores only.
FRAME_FREE: frozenset[str] = frozenset({"pca_mds"})

#: Module each optional published tool needs (checked before spawning a run).
PEER_MODULES: dict[str, str] = {"celery": "CeLEry", "tangram": "tangram", "novosparc": "novosparc"}

TASKS: tuple[str, ...] = ("impute", "transfer", "anchored")
SCORES: tuple[str, ...] = (
    "dist_pearson",
    "dist_spearman",
    "knn10",
    "median_error",
    "procrustes_rmse",
    "coverage90",
    "radius_spearman",
    "radius_median",
)
#: Scores of methods that report a per-cell radius (impute and anchored); radius_median is in
#: reference cell spacings (the unit of median_error).
RADIUS_SCORES: tuple[str, ...] = ("coverage90", "radius_spearman", "radius_median")

#: dist_pearson means of ANCHORS.md (knn_regression and pca_mds over seeds 0-2; published tools
#: as reported there), shown next to our numbers in results.md.
ANCHOR_DIST_PEARSON: dict[tuple[str, str, str], float] = {}


def _add_anchors(task: str, unit: str, values: Sequence[float | None]) -> None:
    for method, value in zip(
        ("knn_regression", "pca_mds", "celery", "tangram", "novosparc"), values
    ):
        if value is not None:
            ANCHOR_DIST_PEARSON[(task, unit, method)] = value


for _unit, _vals in {
    "bdtnp_3d": (0.997, 0.478, None, 0.962, 0.983),
    "dlpfc_151673": (0.646, 0.378, 0.537, 0.460, 0.529),
    "dlpfc_151674": (0.684, 0.342, 0.599, 0.473, 0.556),
    "merfish_bregma0.21": (0.330, 0.095, 0.326, 0.290, 0.367),
    "osmfish_sscortex": (0.491, 0.214, 0.506, 0.474, 0.489),
    "st_breast_cancer_layer1": (0.297, 0.344, 0.592, 0.536, 0.581),
    "st_breast_cancer_layer2": (0.399, 0.284, 0.439, 0.367, 0.442),
    "st_breast_cancer_layer3": (0.407, 0.388, 0.474, 0.426, 0.508),
    "st_breast_cancer_layer4": (0.339, 0.347, 0.483, 0.447, 0.523),
    "starmap3d_visp": (0.517, 0.213, None, None, None),
}.items():
    _add_anchors("impute", _unit, _vals)
_add_anchors("transfer", "dlpfc_151673->dlpfc_151674", (0.508, 0.351, 0.553, 0.424, 0.537))
_add_anchors(
    "transfer",
    "st_breast_cancer_layer1->st_breast_cancer_layer2",
    (0.371, 0.312, 0.424, 0.349, 0.487),
)

#: ``obs`` columns used to colour the figures when present (cell classes), in order of preference.
CLASS_COLUMNS: tuple[str, ...] = (
    "ClusterName",
    "Cell_class",
    "cell_type",
    "celltype",
    "layer_guess",
)

CSV_COLUMNS: tuple[str, ...] = (
    "task",
    "unit",
    "method",
    "seed",
    "status",
    *SCORES,
    "wall_s",
    "reused_s",
    "peak_mb",
    "peak_delta_mb",
    "n_ref",
    "n_query",
    "n_genes",
    "dim",
)


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------

#: Folder of the commands' YAML defaults; ``protocol.yaml`` is this command's.
CONF_DIR = Path(__file__).resolve().parent / "conf"
ROOT_FILE = "protocol.yaml"


@dataclass
class BenchmarkConfig:
    """The checked arguments, with the units to run resolved (defaults: ``conf/protocol.yaml``)."""

    data_dir: Path
    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    datasets: tuple[str, ...]
    out: Path
    timeout: float
    threads: int
    files: dict[str, Path] = field(default_factory=dict)  # dataset id -> file
    impute_units: tuple[str, ...] = ()
    transfer_units: tuple[tuple[str, str], ...] = ()
    anchor_fractions: tuple[float, ...] = (0.05, 0.1)
    anchored_units: tuple[tuple[str, str, float], ...] = ()
    dpvae_overrides: tuple[str, ...] = ()
    finetune_overrides: tuple[str, ...] = ()
    cache: Path | None = None  # anchored: the section-A models (None: out / "cache")

    @property
    def cache_dir(self) -> Path:
        """Folder of the cached section-A models of the anchored task."""
        return self.cache if self.cache is not None else self.out / "cache"


#: Environment variables that set the thread pools (BLAS, OpenMP) of a run's process.
THREAD_ENV = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _names(key: str, values: Any) -> list[str]:
    names = [str(v).strip() for v in values if str(v).strip()]
    if not names:
        raise ConfigError(f"{key}= needs at least one value")
    return list(dict.fromkeys(names))


def _choices(key: str, values: Any, valid: Sequence[str], what: str) -> tuple[str, ...]:
    """The names in ``values``, deduplicated in order, each one of ``valid``."""
    names = _names(key, values)
    bad = [n for n in names if n not in valid]
    if bad:
        raise ConfigError(f"unknown {what} {bad[0]!r}; valid: {', '.join(valid)}")
    return tuple(names)


def _dataset_files(data_dir: Path) -> dict[str, Path]:
    """Dataset id -> path for every ``.h5ad`` in ``data_dir`` (known ids for known files)."""
    by_name = {fname: key for key, fname in DATASETS.items()}
    out: dict[str, Path] = {}
    for path in sorted(data_dir.glob("*.h5ad")):
        out[by_name.get(path.name, path.stem)] = path
    return out


def _resolve_dataset(name: str, files: dict[str, Path]) -> str:
    """Map a dataset id or file stem to its id, or raise ConfigError listing the choices."""
    if name in files:
        return name
    for key, path in files.items():
        if name in (path.stem, path.name):
            return key
    raise ConfigError(
        f"unknown dataset {name!r}; valid: all, {', '.join(files) or '(no .h5ad files found)'}"
    )


def _pairs(values: list[str], files: dict[str, Path], selected: list[str]) -> list[tuple[str, str]]:
    if values == ["default"]:
        return [(a, b) for a, b in DEFAULT_PAIRS if a in selected and b in selected]
    if values == ["none"]:
        return []
    pairs = []
    for item in values:
        sep = "->" if "->" in item else ":"
        parts = item.split(sep)
        if len(parts) != 2 or not all(p.strip() for p in parts):
            raise ConfigError(f"pairs are default, none or REF->QUERY / REF:QUERY, got {item!r}")
        a, b = (_resolve_dataset(p.strip(), files) for p in parts)
        if a == b:
            raise ConfigError(f"a transfer pair needs two different sections, got {item!r}")
        pairs.append((a, b))
    return list(dict.fromkeys(pairs))


def _fractions(values: Any) -> tuple[float, ...]:
    out = []
    for v in values if isinstance(values, Sequence) and not isinstance(values, str) else [values]:
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < float(v) < 1:
            raise ConfigError(f"anchor_fractions must be numbers between 0 and 1, got {v!r}")
        out.append(float(v))
    if not out:
        raise ConfigError("anchor_fractions= needs at least one value")
    return tuple(dict.fromkeys(out))


def _overrides(key: str, value: Any) -> tuple[str, ...]:
    """Space-separated ``key=value`` words (shell quoting rules) of a text key."""
    import shlex

    text = "" if value is None else str(value)
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from exc
    bad = [w for w in words if "=" not in w]
    if bad:
        raise ConfigError(f"{key} takes space-separated key=value overrides, got {bad[0]!r}")
    return tuple(words)


def config_from(cfg: DictConfig) -> BenchmarkConfig:
    """Check the composed ``protocol.yaml`` configuration and resolve the units to run.

    Raises:
        ConfigError: an unknown task, method or dataset (the message lists the valid choices),
            a bad seed, timeout, thread count or pair, a ``data_dir`` that is not a folder of
            ``.h5ad`` files, or nothing to run.
    """
    from omegaconf import OmegaConf

    known = [str(k) for k in OmegaConf.load(CONF_DIR / ROOT_FILE)]
    extra = [str(k) for k in cfg if str(k) not in known]
    if extra:
        raise ConfigError(f"unknown key {extra[0]!r}; valid keys: {', '.join(known)}")
    seeds = list(cfg.seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ConfigError(f"seeds must be non-negative integers, got {seeds}")
    timeout = float(cfg.timeout)
    if not (timeout > 0 and math.isfinite(timeout)):
        raise ConfigError(f"timeout must be > 0 seconds, got {cfg.timeout}")
    threads = _cpu_count() if cfg.threads is None else cfg.threads
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be a positive integer or null, got {cfg.threads!r}")
    if not str(cfg.out).strip():
        raise ConfigError("out= needs a folder")
    out = BenchmarkConfig(
        data_dir=Path(str(cfg.data_dir)).expanduser(),
        tasks=_choices("tasks", cfg.tasks, TASKS, "task"),
        methods=_choices("methods", cfg.methods, METHODS, "method"),
        seeds=tuple(dict.fromkeys(seeds)),
        datasets=tuple(_names("datasets", cfg.datasets)),
        out=Path(str(cfg.out)).expanduser(),
        timeout=timeout,
        threads=threads,
        anchor_fractions=_fractions(list(cfg.anchor_fractions)),
        dpvae_overrides=_overrides("dpvae_overrides", cfg.dpvae_overrides),
        finetune_overrides=_overrides("finetune_overrides", cfg.finetune_overrides),
        cache=None if cfg.cache in (None, "") else Path(str(cfg.cache)).expanduser(),
    )
    if not out.data_dir.is_dir():
        raise ConfigError(
            f"data_dir {str(out.data_dir)!r} is not a folder; give data_dir=PATH to the .h5ad files"
        )
    out.files = _dataset_files(out.data_dir)
    if not out.files:
        raise ConfigError(f"no .h5ad files in data_dir {str(out.data_dir)!r}")
    if out.datasets == ("all",):
        selected = list(out.files)
    else:
        selected = list(dict.fromkeys(_resolve_dataset(n, out.files) for n in out.datasets))
    pairs = _pairs(_names("pairs", cfg.pairs), out.files, selected)
    out.impute_units = tuple(selected) if "impute" in out.tasks else ()
    out.transfer_units = tuple(pairs) if "transfer" in out.tasks else ()
    if "anchored" in out.tasks:
        out.anchored_units = tuple((a, b, f) for a, b in pairs for f in out.anchor_fractions)
    if not (out.impute_units or out.transfer_units or out.anchored_units):
        raise ConfigError("nothing to run: no impute dataset and no transfer pair selected")
    return out


def compose(argv: Sequence[str]) -> DictConfig:
    """``key=value`` arguments composed onto ``conf/protocol.yaml`` (typed; unknown keys fail)."""
    from dpvae.config import load_config

    return load_config(list(argv), conf_dir=CONF_DIR, root_file=ROOT_FILE)


def parse_args(argv: Sequence[str]) -> BenchmarkConfig:
    """:func:`config_from` of :func:`compose`: the checked configuration of ``argv``.

    Raises:
        ConfigError: anything :func:`compose` or :func:`config_from` rejects.
    """
    return config_from(compose(argv))


# --------------------------------------------------------------------------------------------
# Protocol: hygiene, splits, inputs
# --------------------------------------------------------------------------------------------


def _drop_blank(adata: ad.AnnData) -> ad.AnnData:
    from dpvae.io import blank_feature_mask

    keep = blank_feature_mask(adata.var_names)
    return adata if keep.all() else adata[:, keep]


def _drop_bad_cells(adata: ad.AnnData) -> ad.AnnData:
    """Drop cells with zero total expression or a non-finite coordinate; returns a copy."""
    X = adata.X
    totals = np.asarray(X.sum(axis=1)).ravel()
    coords = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    keep = (totals != 0) & np.isfinite(coords).all(axis=1)
    return adata[keep].copy()


def _check_section(adata: ad.AnnData, name: str) -> None:
    if "spatial" not in adata.obsm:
        raise DPVAEError(f"{name} has no obsm['spatial'] coordinates")


def hygiene(adata: ad.AnnData, name: str = "dataset") -> ad.AnnData:
    """The protocol's input hygiene for one section (impute).

    Drops features whose name starts with ``Blank``, then cells whose expression sums to 0 over
    the kept genes or that have a non-finite coordinate. Returns a new AnnData.
    """
    _check_section(adata, name)
    return _drop_bad_cells(_drop_blank(adata))


def hygiene_pair(
    ref: ad.AnnData, query: ad.AnnData, names: tuple[str, str] = ("reference", "query")
) -> tuple[ad.AnnData, ad.AnnData]:
    """The protocol's input hygiene for a transfer pair.

    Drops ``Blank*`` features, keeps the genes present in both sections in the reference's
    order, then drops each section's cells with zero total over those genes or a non-finite
    coordinate.

    Raises:
        DPVAEError: the sections share no gene.
    """
    _check_section(ref, names[0])
    _check_section(query, names[1])
    ref, query = _drop_blank(ref), _drop_blank(query)
    in_query = set(map(str, query.var_names))
    genes = [g for g in map(str, ref.var_names) if g in in_query]
    if not genes:
        raise DPVAEError(f"{names[0]} and {names[1]} share no gene")
    ref = ref[:, genes]
    query = query[:, genes]
    return _drop_bad_cells(ref), _drop_bad_cells(query)


def impute_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference and query cell indices of the protocol's impute split.

    ``perm = default_rng(seed).permutation(n)``, ``n_ref = round(0.8 n)``; returns
    ``(sort(perm[:n_ref]), sort(perm[n_ref:]))``.
    """
    perm = np.random.default_rng(seed).permutation(n)
    n_ref = round(0.8 * n)
    return np.sort(perm[:n_ref]), np.sort(perm[n_ref:])


def anchored_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Anchor and query cell indices of the protocol's anchored split of a section of ``n`` cells.

    ``perm = default_rng(seed).permutation(n)``, ``n_anchor = round(fraction n)``; returns
    ``(sort(perm[:n_anchor]), sort(perm[n_anchor:]))``.
    """
    perm = np.random.default_rng(seed).permutation(n)
    n_anchor = round(fraction * n)
    return np.sort(perm[:n_anchor]), np.sort(perm[n_anchor:])


def _matrix(X: Any) -> Any:
    """A plain in-memory copy of an expression matrix (CSR if sparse, float32 kept)."""
    if sp.issparse(X):
        return sp.csr_matrix(X, copy=True)
    return np.array(X, copy=True)


def method_inputs(ref: ad.AnnData, query: ad.AnnData) -> tuple[ad.AnnData, ad.AnnData]:
    """What a method is given: reference expression + coordinates, query expression only.

    The reference keeps its cell names, genes and ``obsm['spatial']``; everything else (obs
    columns, other obsm, layers, uns) is dropped. The query gets its expression and genes and
    neutral cell names ``q0, q1, ...``: nothing that could leak position.
    """
    import anndata as ad

    var = pd.DataFrame(index=pd.Index(list(map(str, ref.var_names))))
    r = ad.AnnData(
        X=_matrix(ref.X),
        obs=pd.DataFrame(index=pd.Index(list(map(str, ref.obs_names)))),
        var=var,
    )
    r.obsm["spatial"] = np.asarray(ref.obsm["spatial"], dtype=np.float64).copy()
    q = ad.AnnData(
        X=_matrix(query.X),
        obs=pd.DataFrame(index=pd.Index([f"q{i}" for i in range(query.n_obs)])),
        var=pd.DataFrame(index=pd.Index(list(map(str, query.var_names)))),
    )
    return r, q


# --------------------------------------------------------------------------------------------
# Running one method in a child process
# --------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """Outcome of one (method, reference, query, seed) run."""

    status: str  # "ok", "timeout", "not installed" or "error: ..."
    coords: np.ndarray | None = None
    wall_s: float = float("nan")  # the method's whole cost: own fit + predict + reused_s
    peak_mb: float = float("nan")
    peak_delta_mb: float = float("nan")
    radius: np.ndarray | None = None  # per-cell 90% radius, when the method reports one
    reused_s: float = 0.0  # recorded seconds of a cached model the run reused (in wall_s)


def _proc_status_kb(field_name: str) -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return float("nan")


def _reset_peak() -> bool:
    """Reset the process's peak resident size (Linux ``clear_refs``); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_kb(reset_ok: bool) -> float:
    peak = _proc_status_kb("VmHWM") if reset_ok else float("nan")
    if not math.isfinite(peak):
        import resource

        peak = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # kB on Linux
    return peak


def _method_callable(method: str) -> Any:
    """``fn(ref, query, task, seed, ctx) -> coordinates or (coordinates, radius)`` for
    ``method``, its modules imported (the imports are not part of the timed fit + predict).

    ``ctx`` carries the run's extras (:func:`run_method`'s ``extras``; the anchored task's
    ``source`` section, ``cache``, overrides); a method that reuses a cached model sets
    ``ctx["reused_s"]`` to that model's recorded training seconds. ``"MODULE:FUNCTION"`` names
    any importable callable of that signature (how the tests plug in a fake method).
    """
    if ":" in method:
        import importlib

        module, _, name = method.partition(":")
        return getattr(importlib.import_module(module), name)
    if method == "dpvae_cli":
        return _dpvae_commands
    if method in ("dpvae", *ANCHORED_ONLY):
        # torch, Lightning and dpvae's modules before the clock starts, as a Python session has
        # them (a command's start-up is what dpvae_cli times)
        import dpvae.api  # noqa: F401
        import dpvae.callbacks  # noqa: F401
        import dpvae.datamodules  # noqa: F401
        import dpvae.module  # noqa: F401

        def run_dpvae(ref: Any, query: Any, task: str, seed: int, ctx: dict[str, Any]) -> Any:
            if task == "anchored":
                return _dpvae_anchored(method, ref, query, seed, ctx)
            from dpvae.api import fit_predict

            overrides = ctx.get("dpvae_overrides", ())
            if task != "impute":  # a transfer's radius is not scored (another frame)
                return fit_predict(ref, query, task=task, seed=seed, overrides=overrides)
            # with the 90% radius, scored as coverage and radius-error correlation (issue 11)
            coords, radius = fit_predict(
                ref, query, task=task, seed=seed, overrides=overrides, radius=True
            )
            return _with_radius(coords, radius)

        return run_dpvae
    from benchmarks.comparators import COMPARATORS

    if method == "pca_mds":
        import dpvae.solver  # noqa: F401 - torch, imported by pca_mds
    if method in PEER_MODULES:  # the tool's package before the clock, as dpvae's are
        import importlib

        try:
            importlib.import_module(PEER_MODULES[method])
        except ImportError:
            pass  # the wrapper raises NotInstalledError

    return lambda ref, query, task, seed, ctx: COMPARATORS[method](ref, query, seed)


def _dpvae_commands(
    ref: ad.AnnData, query: ad.AnnData, task: str, seed: int, ctx: dict[str, Any]
) -> Any:
    """dpvae through the user's two commands, each a new Python process: ``train.py`` on the
    reference, then ``python -m dpvae.predict`` on the query (start-up, file reading and writing
    included; the inputs are written to a temporary folder before the clock starts)."""
    import subprocess
    import tempfile

    import anndata as ad

    with tempfile.TemporaryDirectory(prefix="dpvae_cli_") as tmp:
        folder = Path(tmp)
        ref.write_h5ad(folder / "ref.h5ad")
        query.write_h5ad(folder / "query.h5ad")
        run, out = folder / "run", folder / "placed.h5ad"
        threads = os.environ.get("OMP_NUM_THREADS")
        common = [f"threads={threads}"] if threads else []
        train = [
            sys.executable,
            str(CHECKOUT / "train.py"),
            f"data.reference={folder / 'ref.h5ad'}",
        ]
        train += [f"run_dir={run}", f"seed={seed}", "logger=none", *common]
        train += list(ctx.get("dpvae_overrides", ()))
        predict = [sys.executable, "-m", "dpvae.predict", f"checkpoint={run / 'model.ckpt'}"]
        predict += [f"query={folder / 'query.h5ad'}", f"output={out}"]
        if task == "transfer":  # as fit_predict: the new section's codes centred on the reference
            predict.append("align_query=true")
        for argv in (train, predict):
            done = subprocess.run(argv, capture_output=True, text=True, cwd=CHECKOUT)
            if done.returncode != 0:
                last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
                raise RuntimeError(f"{Path(argv[1]).name} exited {done.returncode}: {last[0]}")
        placed = ad.read_h5ad(out)
        coords = np.asarray(placed.obsm["spatial_dpvae"], dtype=np.float64)
        radius = placed.obs.get("dpvae_radius90") if task == "impute" else None
        return _with_radius(coords, None if radius is None else np.asarray(radius, np.float64))


def _fingerprint(adata: ad.AnnData, seed: int, overrides: Sequence[str]) -> str:
    """A digest of a training section (genes, cells, expression, coordinates), seed, overrides
    and dpvae's default training configuration (a changed default retrains the cached models)."""
    import hashlib

    from omegaconf import OmegaConf

    from dpvae.config import load_config

    h = hashlib.sha256()
    h.update(OmegaConf.to_yaml(load_config([])).encode())
    h.update("\0".join(map(str, adata.var_names)).encode())
    h.update("\0".join(map(str, adata.obs_names)).encode())
    X = adata.X
    data = X.data if sp.issparse(X) else np.asarray(X)
    h.update(np.ascontiguousarray(data, dtype=np.float64).tobytes())
    if sp.issparse(X):
        h.update(np.ascontiguousarray(X.indices).tobytes())
        h.update(np.ascontiguousarray(X.indptr).tobytes())
    h.update(np.ascontiguousarray(adata.obsm["spatial"], dtype=np.float64).tobytes())
    h.update(f"seed={seed}\0{chr(0).join(overrides)}".encode())
    return h.hexdigest()[:16]


def _source_model(source: ad.AnnData, seed: int, ctx: dict[str, Any]) -> Any:
    """The dpvae model trained on ``source`` (section A) with ``seed``: from ``ctx["cache"]``
    when a matching one is there (then ``ctx["reused_s"]`` = its recorded training seconds),
    else trained now (its time is part of this run's) and stored there."""
    import json
    import shutil

    import dpvae

    overrides = tuple(ctx.get("dpvae_overrides", ()))
    key = _fingerprint(source, seed, overrides)
    cache = Path(ctx["cache"]) if ctx.get("cache") else None
    folder = (
        cache / f"{_slug(str(ctx.get('pair', 'source')))}__seed{seed}__{key}" if cache else None
    )
    record = folder / "fit.json" if folder else None
    if record is not None and record.is_file():
        meta = json.loads(record.read_text())
        if meta.get("fingerprint") == key:
            model = dpvae.load(folder)
            ctx["reused_s"] = float(meta["fit_s"])
            print(f"benchmark: reusing {folder} (trained in {meta['fit_s']:.1f} s)", flush=True)
            return model
    t0 = time.perf_counter()
    model = dpvae.fit(source, f"seed={seed}", *overrides)
    fit_s = time.perf_counter() - t0
    if folder is not None and record is not None:
        tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save(tmp)
        (tmp / "fit.json").write_text(
            json.dumps({"fingerprint": key, "fit_s": fit_s, "seed": seed, "overrides": overrides})
        )
        shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # another run stored the same model meanwhile: keep that one
            shutil.rmtree(tmp, ignore_errors=True)
    return model


def _dpvae_place(model: Any, query: ad.AnnData, reference: Any = None, **kwargs: Any) -> Any:
    """Query coordinates from ``model`` (against ``reference``, else the model's own reference
    cells; ``kwargs``: further options of the placement, e.g. ``anchors``); ``(coordinates, radius)`` when the prediction reports a 90% radius
    (:meth:`dpvae.api.Model.predict_with_radius`, or ``obs['dpvae_radius90']`` of
    :meth:`~dpvae.api.Model.annotate`) for some cell."""
    if hasattr(model, "predict_with_radius"):
        coords, radius = model.predict_with_radius(query, reference=reference, **kwargs)
        coords, radius = np.asarray(coords, dtype=np.float64), np.asarray(radius, np.float64)
    else:
        placed = model.annotate(query.copy(), reference=reference, **kwargs)
        coords = np.asarray(placed.obsm["spatial_dpvae"], dtype=np.float64)
        col = placed.obs.get("dpvae_radius90")
        radius = None if col is None else np.asarray(col, dtype=np.float64)
    return _with_radius(coords, radius)


def _with_radius(coords: np.ndarray, radius: np.ndarray | None) -> Any:
    """``(coordinates, radius)``, or the coordinates alone when no cell has a radius (not
    calibrated, e.g. fewer than 4 reference cells)."""
    if radius is None or not np.isfinite(radius).any():
        return coords
    return coords, radius


def _dpvae_anchored(
    method: str, anchors: ad.AnnData, query: ad.AnnData, seed: int, ctx: dict[str, Any]
) -> Any:
    """The dpvae variants of the anchored task (see the module docstring)."""
    import dpvae

    overrides = tuple(ctx.get("dpvae_overrides", ()))
    if method == "dpvae_anchors":
        model = dpvae.fit(anchors, f"seed={seed}", *ANCHORS_ONLY_OVERRIDES, *overrides)
        return _dpvae_place(model, query)
    if ctx.get("source") is None:
        raise ValueError(f"{method} on the anchored task needs section A (ctx['source'])")
    base = _source_model(ctx["source"], seed, ctx)
    if method == "dpvae_zeroshot":
        return _dpvae_place(base, query, reference=anchors)
    if method == "dpvae_through":
        return _dpvae_place(base, query, anchors=anchors)
    tuned = base.fine_tune(anchors, f"seed={seed}", *ctx.get("finetune_overrides", ()))
    return _dpvae_place(tuned, query)  # against its own reference cells: the anchors


def _redirect_output(log_path: str | None) -> None:
    """Send the child's stdout and stderr (file descriptors 1 and 2) to ``log_path``."""
    if not log_path:
        return
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _split_output(out: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """A method's result as (coordinates, radius or None): it returns coordinates, or a
    ``(coordinates, radius)`` pair with one radius per query cell."""
    if isinstance(out, tuple):
        if len(out) != 2:
            raise ValueError(f"a method returns coordinates or (coordinates, radius), got {out!r}")
        coords, radius = _as_numpy(out[0]), _as_numpy(out[1])
        if radius.ndim != 1 or radius.shape[0] != coords.shape[0]:
            raise ValueError(
                f"radius has shape {radius.shape}, expected ({coords.shape[0]},): one per cell"
            )
        return coords, radius
    return _as_numpy(out), None


def _child(
    conn: Any,
    method: str,
    inputs_path: str,
    task: str,
    seed: int,
    log_path: str | None = None,
) -> None:
    """Child-process body: load the pickled (ref, query, extras), run the method, send back
    (status, coords, radius, wall seconds, peak MB, peak MB above the loaded inputs, reused
    seconds)."""
    try:
        _redirect_output(log_path)
        import pickle

        from benchmarks.comparators import NotInstalledError

        with open(inputs_path, "rb") as fh:
            ref, query, extras = pickle.load(fh)

        fn = _method_callable(method)
        ctx: dict[str, Any] = dict(extras)
        reset_ok = _reset_peak()
        rss0 = _proc_status_kb("VmRSS")
        t0 = time.perf_counter()
        out = fn(ref, query, task, seed, ctx)
        wall = time.perf_counter() - t0
        peak = _peak_kb(reset_ok)
        coords, radius = _split_output(out)
        reused = float(ctx.get("reused_s", 0.0))
        conn.send(("ok", coords, radius, wall, peak / 1024.0, (peak - rss0) / 1024.0, reused))
    except NotInstalledError:
        nan = float("nan")
        conn.send(("not installed", None, None, nan, nan, nan, 0.0))
    except BaseException as exc:  # noqa: BLE001 - anything a method raises is a recorded error
        traceback.print_exc()
        msg = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        nan = float("nan")
        conn.send((f"error: {msg[:300]}", None, None, nan, nan, nan, 0.0))
    finally:
        conn.close()


def run_method(
    method: str,
    ref: ad.AnnData,
    query: ad.AnnData,
    task: str,
    seed: int,
    timeout: float = 600.0,
    log_path: Path | None = None,
    threads: int | None = None,
    extras: dict[str, Any] | None = None,
) -> RunResult:
    """Run one method on (ref, query) in a fresh 'spawn' child process with a timeout.

    ``extras`` reach the method as its ``ctx`` (picklable values: the anchored task's
    ``source`` AnnData, ``cache`` folder, ``pair`` name, ``dpvae_overrides``,
    ``finetune_overrides``).

    The child times fit + predict and measures the process's peak resident memory over that
    window; the coordinates come back through a pipe, the child's output goes to ``log_path``
    (inherited stdout/stderr when None). ``threads`` sets the child's BLAS/OpenMP thread pools
    (through :data:`THREAD_ENV`; inherited when None). Never raises for a method's failure.
    """
    if method in PEER_MODULES and importlib.util.find_spec(PEER_MODULES[method]) is None:
        return RunResult("not installed")
    import pickle
    import tempfile

    # The inputs travel through a file: a large payload in the spawn arguments would block the
    # parent forever if the child died before reading it.
    with tempfile.TemporaryDirectory(prefix="dpvae-bench-") as tmp:
        inputs_path = Path(tmp) / "inputs.pkl"
        with inputs_path.open("wb") as fh:
            pickle.dump((ref, query, dict(extras or {})), fh, protocol=pickle.HIGHEST_PROTOCOL)
        return _run_child(method, str(inputs_path), task, seed, timeout, log_path, threads)


def _run_child(
    method: str,
    inputs_path: str,
    task: str,
    seed: int,
    timeout: float,
    log_path: Path | None,
    threads: int | None,
) -> RunResult:
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_child,
        args=(send, method, inputs_path, task, seed, str(log_path) if log_path else None),
        daemon=False,  # methods may start worker processes of their own (DataLoader workers)
    )
    start = time.perf_counter()
    saved = {k: os.environ.get(k) for k in THREAD_ENV}
    try:
        if threads is not None:
            os.environ.update({k: str(threads) for k in THREAD_ENV})
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    send.close()
    msg = None
    # allow the child's start-up and imports on top of the method's own time budget
    deadline = start + timeout + 60.0
    try:
        while time.perf_counter() < deadline:
            if recv.poll(min(1.0, max(0.0, deadline - time.perf_counter()))):
                msg = recv.recv()
                break
            if not proc.is_alive():
                break
    except (EOFError, OSError):
        msg = None
    finally:
        recv.close()
    if msg is None:
        timed_out = time.perf_counter() >= deadline
        if not timed_out:
            proc.join(10)  # it closed the pipe without a result: let it finish exiting
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
            if proc.is_alive():
                proc.kill()
            proc.join(5)
        if timed_out:
            return RunResult("timeout", wall_s=timeout)
        where = f"; see {log_path}" if log_path else ""
        return RunResult(
            f"error: the run's process ended without a result (exit code {proc.exitcode}){where}"
        )
    proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join(5)
    status, coords, radius, wall, peak, delta, reused = msg
    if status == "ok" and wall > timeout:
        return RunResult("timeout", wall_s=wall, peak_mb=peak, peak_delta_mb=delta)
    return RunResult(status, coords, wall + reused, peak, delta, radius, reused)


# --------------------------------------------------------------------------------------------
# The benchmark loop
# --------------------------------------------------------------------------------------------


Unit = str | tuple[str, str] | tuple[str, str, float]


def _fraction_text(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def _unit_name(unit: Unit) -> str:
    """``dataset``, ``A->B`` (transfer) or ``A->B@5%`` (anchored, 5% anchors)."""
    if isinstance(unit, str):
        return unit
    if len(unit) == 3:
        return f"{unit[0]}->{unit[1]}@{_fraction_text(unit[2])}"
    return f"{unit[0]}->{unit[1]}"


def _slug(name: str) -> str:
    return name.replace("->", "__to__").replace("/", "_").replace("@", "__").replace("%", "pct")


def radius_scores(P: np.ndarray, T: np.ndarray, radius: np.ndarray) -> dict[str, float]:
    """:func:`dpvae.metrics.radius_scores` (imported here, not at start-up: ``--help`` stays
    light)."""
    from dpvae.metrics import radius_scores as scores

    return scores(P, T, radius)


def _score(
    method: str,
    task: str,
    P: np.ndarray,
    T: np.ndarray,
    ref_coords: np.ndarray,
    radius: np.ndarray | None = None,
) -> dict[str, float]:
    """The protocol's scores of one prediction. ``ref_coords``: the coordinates whose median
    nearest-neighbour distance divides median_error (impute: the reference; anchored: all of
    section B, anchors and query). ``radius`` adds coverage90, radius_spearman and radius_median (impute and
    anchored)."""
    from dpvae.metrics import median_nn_distance, score_coordinates

    if P.shape != T.shape:
        raise ValueError(f"prediction has shape {P.shape}, expected {T.shape}")
    if not np.isfinite(P).all():
        raise ValueError("prediction contains non-finite values")
    kind = "impute" if task == "anchored" else task
    spacing = median_nn_distance(ref_coords)
    scores = score_coordinates(P, T, kind, ref_nn_distance=spacing)
    if method in FRAME_FREE and "median_error" in scores:
        scores["median_error"] = float("nan")  # arbitrary frame: rotation-invariant scores only
    if radius is not None and kind == "impute" and method not in FRAME_FREE:
        scores.update(radius_scores(P, T, radius))
        scores["radius_median"] = float(np.nanmedian(radius) / spacing)
    return scores


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "" if math.isnan(x) else f"{x:.6g}"
    return str(x)


class _CsvWriter:
    def __init__(self, path: Path) -> None:
        self.path = path
        with path.open("w", newline="") as fh:
            csv.writer(fh).writerow(CSV_COLUMNS)

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as fh:
            csv.writer(fh).writerow([_fmt(row.get(c, "")) for c in CSV_COLUMNS])


def _runs_for_unit(
    cfg: BenchmarkConfig,
    task: str,
    unit: Unit,
    writer: _CsvWriter,
    log: Any,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Load, clean and split one unit; run every method and seed. Returns rows and plot data."""
    name = _unit_name(unit)
    rows: list[dict[str, Any]] = []
    plot: dict[str, Any] = {"task": task, "unit": name, "pred": {}, "score": {}}

    def record(row: dict[str, Any]) -> None:
        rows.append(row)
        writer.write(row)
        sc = row.get("dist_pearson", float("nan"))
        log(
            f"[{task}] {name} {row['method']} seed={row['seed']}: {row['status']}"
            + (f" dist_pearson={sc:.3f}" if isinstance(sc, float) and not math.isnan(sc) else "")
            + (
                f" ({row['wall_s']:.1f} s)"
                if math.isfinite(row.get("wall_s", float("nan")))
                else ""
            )
        )

    import anndata as ad

    methods = [
        m
        for m in cfg.methods
        if (m not in ANCHORED_ONLY or task == "anchored")
        and (m not in NOT_ANCHORED or task != "anchored")
    ]
    if len(methods) < len(cfg.methods):
        skipped = ", ".join(m for m in cfg.methods if m not in methods)
        where = "the anchored task" if task != "anchored" else "impute and transfer"
        log(f"[{task}] {name}: {skipped} only run on {where}")
    try:
        if isinstance(unit, str):
            full = hygiene(ad.read_h5ad(cfg.files[unit]), unit)
            sections = None
        else:
            a, b = unit[0], unit[1]
            ref_full, query_full = hygiene_pair(
                ad.read_h5ad(cfg.files[a]), ad.read_h5ad(cfg.files[b]), (a, b)
            )
            sections = (ref_full, query_full)
    except Exception as exc:  # a broken file: record it for every method and seed, go on
        for method in methods:
            for seed in cfg.seeds:
                record(
                    {
                        "task": task,
                        "unit": name,
                        "method": method,
                        "seed": seed,
                        "status": f"error: cannot load data: {type(exc).__name__}: {exc}",
                    }
                )
        return rows, plot

    plot_seed = 0 if 0 in cfg.seeds else cfg.seeds[0]
    source_in = None
    if task == "anchored" and sections is not None:
        # section A as a method's input (expression and coordinates), for the dpvae variants
        source_in = method_inputs(sections[0], sections[0][:0])[0]
    for seed in cfg.seeds:
        colour_ref = None
        if sections is None:
            ri, qi = impute_split(full.n_obs, seed)
            ref_sec, query_sec = full[ri], full[qi]
            nn_coords = ref_sec.obsm["spatial"]
        elif task == "anchored":
            assert isinstance(unit, tuple) and len(unit) == 3
            section_b = sections[1]
            ai, qi = anchored_split(section_b.n_obs, unit[2], seed)
            if len(ai) < 2 or len(qi) < 2:
                msg = f"error: {len(ai)} anchor and {len(qi)} query cells; need 2 of each"
                for method in methods:
                    record(
                        {"task": task, "unit": name, "method": method, "seed": seed, "status": msg}
                    )
                continue
            ref_sec, query_sec = section_b[ai], section_b[qi]
            nn_coords = section_b.obsm["spatial"]  # B's cell spacing: the anchors are too sparse
            colour_ref = section_b
        else:
            ref_sec, query_sec = sections
            nn_coords = ref_sec.obsm["spatial"]
        ref_in, query_in = method_inputs(ref_sec, query_sec)
        T = np.asarray(query_sec.obsm["spatial"], dtype=np.float64)
        ref_coords = np.asarray(nn_coords, dtype=np.float64)
        if seed == plot_seed:
            plot.update(
                ref=colour_ref if colour_ref is not None else ref_sec, query=query_sec, seed=seed
            )
            if task == "anchored":
                plot["anchors"] = np.asarray(ref_sec.obsm["spatial"], dtype=np.float64)
        for method in methods:
            log_dir = cfg.out / "logs"
            log_dir.mkdir(exist_ok=True)
            log_path = log_dir / f"{task}__{_slug(name)}__{method}__seed{seed}.log"
            extras: dict[str, Any] = {"dpvae_overrides": cfg.dpvae_overrides}
            if task == "anchored":
                extras.update(
                    finetune_overrides=cfg.finetune_overrides,
                    cache=str(cfg.cache_dir),
                    pair=_unit_name((unit[0], unit[1])),
                    source=source_in if method in FROM_SOURCE else None,
                )
            res = run_method(
                method,
                ref_in,
                query_in,
                task,
                seed,
                cfg.timeout,
                log_path,
                cfg.threads,
                extras=extras,
            )
            if log_path.exists() and log_path.stat().st_size == 0:
                log_path.unlink()
            row: dict[str, Any] = {
                "task": task,
                "unit": name,
                "method": method,
                "seed": seed,
                "status": res.status,
                "wall_s": res.wall_s,
                "reused_s": res.reused_s,
                "peak_mb": res.peak_mb,
                "peak_delta_mb": res.peak_delta_mb,
                "n_ref": ref_in.n_obs,
                "n_query": query_in.n_obs,
                "n_genes": ref_in.n_vars,
                "dim": T.shape[1],
            }
            if res.status == "ok" and res.coords is not None:
                try:
                    row.update(_score(method, task, res.coords, T, ref_coords, res.radius))
                except Exception as exc:
                    row["status"] = f"error: scoring failed: {type(exc).__name__}: {exc}"
                else:
                    pred_dir = cfg.out / "predictions"
                    pred_dir.mkdir(exist_ok=True)
                    stem = f"{task}__{_slug(name)}__{method}__seed{seed}"
                    np.save(pred_dir / f"{stem}.npy", res.coords)
                    if res.radius is not None:
                        np.save(pred_dir / f"{stem}__radius.npy", res.radius)
                    if seed == plot_seed:
                        plot["pred"][method] = res.coords
                        plot["score"][method] = row["dist_pearson"]
            record(row)
    return rows, plot


def run_benchmark(cfg: BenchmarkConfig, log: Any = print) -> pd.DataFrame:
    """Run every selected (task, unit, method, seed), write results.csv/.md and figures.

    Returns the per-run table (as in results.csv).
    """
    cfg.out.mkdir(parents=True, exist_ok=True)
    writer = _CsvWriter(cfg.out / "results.csv")
    all_rows: list[dict[str, Any]] = []
    units: list[tuple[str, Unit]] = [("impute", u) for u in cfg.impute_units]
    units += [("transfer", p) for p in cfg.transfer_units]
    units += [("anchored", u) for u in cfg.anchored_units]
    for task, unit in units:
        rows, plot = _runs_for_unit(cfg, task, unit, writer, log)
        all_rows.extend(rows)
        summary = summarize(pd.DataFrame(all_rows, columns=list(CSV_COLUMNS)))
        write_markdown(summary, cfg.out / "results.md", cfg)
        if plot.get("pred"):
            try:
                path = plot_unit(plot, summary, cfg.out / "figures")
                log(f"figure: {path}")
            except Exception as exc:  # a figure must not sink the benchmark
                log(f"figure for {plot['unit']} failed: {type(exc).__name__}: {exc}")
    try:
        (cfg.out / "logs").rmdir()  # only when no run left a log
    except OSError:
        pass
    return pd.DataFrame(all_rows, columns=list(CSV_COLUMNS))


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------


def _status_text(statuses: Sequence[str]) -> str:
    n_ok = sum(s == "ok" for s in statuses)
    if n_ok == len(statuses):
        return "ok"
    other = [s for s in statuses if s != "ok"]
    first = max(set(other), key=other.count)
    return f"{n_ok}/{len(statuses)} ok; {first}" if n_ok else first


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, unit, method): mean and sd (ddof=1) of each score over ok runs.

    Columns: task, unit, method, n_ok, n_runs, status, ``{score}_mean``, ``{score}_sd`` for each
    score, wall_s (and its sd wall_sd), reused_s, peak_mb (means over ok runs).
    """
    out = []
    if runs.empty:
        return pd.DataFrame()
    for (task, unit, method), grp in runs.groupby(["task", "unit", "method"], sort=False):
        ok = grp[grp["status"] == "ok"]
        row: dict[str, Any] = {
            "task": task,
            "unit": unit,
            "method": method,
            "n_ok": len(ok),
            "n_runs": len(grp),
            "status": _status_text(list(grp["status"])),
        }
        for s in SCORES:
            vals = pd.to_numeric(ok[s], errors="coerce").dropna().to_numpy(dtype=float)
            row[f"{s}_mean"] = float(vals.mean()) if vals.size else float("nan")
            row[f"{s}_sd"] = (
                float(vals.std(ddof=1)) if vals.size > 1 else (0.0 if vals.size else float("nan"))
            )
        for s in ("wall_s", "reused_s", "peak_mb"):
            vals = pd.to_numeric(ok[s], errors="coerce").dropna().to_numpy(dtype=float)
            row[s] = float(vals.mean()) if vals.size else float("nan")
        wall = pd.to_numeric(ok["wall_s"], errors="coerce").dropna().to_numpy(dtype=float)
        row["wall_sd"] = float(wall.std(ddof=1)) if wall.size > 1 else 0.0
        row["anchor_dist_pearson"] = ANCHOR_DIST_PEARSON.get((task, unit, method), float("nan"))
        out.append(row)
    return pd.DataFrame(out)


def _pm(mean: float, sd: float) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:.3f} ± {sd:.3f}"


def _has(summary: pd.DataFrame, col: str) -> bool:
    return col in summary and bool(pd.to_numeric(summary[col], errors="coerce").notna().any())


def write_markdown(summary: pd.DataFrame, path: Path, cfg: BenchmarkConfig | None = None) -> None:
    """Write the summary as a Markdown table (one row per task, unit and method).

    coverage90 and radius_spearman columns appear when some method reported radii; an anchored
    run adds the comparison of the fine-tuned ``dpvae`` with the other methods per unit.
    """
    radius = [s for s in RADIUS_SCORES if _has(summary, f"{s}_mean")]
    scores = [s for s in SCORES if s not in RADIUS_SCORES or s in radius]
    lines = [
        "# Spatial reconstruction benchmark",
        "",
        "Protocol: BENCHMARK.md. Scores on query cells, mean ± sd over seeds"
        + (f" {','.join(map(str, cfg.seeds))}" if cfg else "")
        + (f"; {cfg.threads} thread(s) per run" if cfg else "")
        + "; wall s = fit + predict (mean ± sd; for anchored dpvae, dpvae_zeroshot and"
        " dpvae_through it includes the training on section A, also when the cached A model was"
        " reused); peak MB = the run's process peak resident memory during fit + predict (inputs included)."
        " median_error (impute, anchored) and procrustes_rmse (transfer) are in cell spacings"
        " (lower is better; anchored: the spacing of all of section B); pca_mds has an arbitrary"
        " frame, so no median_error. anchor = ANCHORS.md's dist_pearson.",
        "",
        "| task | unit | method | " + " | ".join(scores) + " | wall s | peak MB | runs | anchor |",
        "|" + "---|" * (len(scores) + 7),
    ]
    for _, r in summary.iterrows():
        runs = r["status"] if r["status"] != "ok" else f"{r['n_ok']}/{r['n_runs']}"
        anchor = r.get("anchor_dist_pearson", float("nan"))
        wall_sd = r.get("wall_sd", float("nan"))
        wall = "—" if math.isnan(r["wall_s"]) else f"{r['wall_s']:.1f}"
        if wall != "—" and not math.isnan(wall_sd) and r["n_ok"] > 1:
            wall += f" ± {wall_sd:.1f}"
        lines.append(
            "| "
            + " | ".join(
                [
                    str(r["task"]),
                    str(r["unit"]),
                    str(r["method"]),
                    *(_pm(r[f"{s}_mean"], r[f"{s}_sd"]) for s in scores),
                    wall,
                    "—" if math.isnan(r["peak_mb"]) else f"{r['peak_mb']:.0f}",
                    runs.replace("|", "/"),
                    "" if math.isnan(anchor) else f"{anchor:.3f}",
                ]
            )
            + " |"
        )
    lines += _anchored_comparison(summary)
    path.write_text("\n".join(lines) + "\n")


def _anchored_comparison(summary: pd.DataFrame) -> list[str]:
    """Lines comparing the fine-tuned dpvae with every other method on each anchored unit."""
    if summary.empty or "anchored" not in set(summary["task"]):
        return []
    sub = summary[summary["task"] == "anchored"]
    out = [
        "",
        "## Anchored: fine-tuned dpvae against the others (dist_pearson means)",
        "",
        "dpvae_through, the route through section A's cells that the fine-tuned dpvae may take,"
        " is not among the others.",
        "",
        "| unit | dpvae (fine-tuned) | best other | margin | margin over knn_regression |",
        "|---|---|---|---|---|",
    ]
    for unit, grp in sub.groupby("unit", sort=False):
        score = dict(zip(grp["method"], grp["dist_pearson_mean"]))
        mine = score.get("dpvae", float("nan"))
        # dpvae_through is one of the two routes the fine-tuned dpvae chooses between: apart
        others = {m: v for m, v in score.items() if m not in ROUTES and not math.isnan(v)}
        if math.isnan(mine) or not others:
            continue
        best = max(others, key=lambda m: others[m])
        knn = others.get("knn_regression", float("nan"))
        out.append(
            f"| {unit} | {mine:.3f} | {best} {others[best]:.3f} | {mine - others[best]:+.3f} | "
            + ("—" if math.isnan(knn) else f"{mine - knn:+.3f}")
            + " |"
        )
    return out


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _align(P: np.ndarray, T: np.ndarray) -> np.ndarray:
    """``P`` mapped onto ``T`` by the least-squares similarity (rotation/reflection, scale, shift)."""
    pm, tm = P.mean(axis=0), T.mean(axis=0)
    pc, tc = P - pm, T - tm
    u, s, vt = np.linalg.svd(pc.T @ tc)
    norm2 = float((pc**2).sum())
    scale = float(s.sum()) / norm2 if norm2 > 0 else 0.0
    return scale * pc @ (u @ vt) + tm


def _colouring(ref: ad.AnnData, query: ad.AnnData) -> tuple[str, np.ndarray, bool]:
    """How to colour query cells: a cell-class obs column if present, else a marker gene.

    The marker gene is, among the reference's 200 most variable log-normalised genes, the one
    whose expression best correlates with its mean over each cell's 10 spatial neighbours.
    Returns (label, values, categorical).
    """
    for col in CLASS_COLUMNS:
        if col in query.obs and query.obs[col].nunique() > 1:
            return col, np.asarray(query.obs[col].astype(str)), True
    from scipy.spatial import cKDTree

    from benchmarks.comparators import is_count_matrix, log_normalize

    counts = is_count_matrix(ref.X)
    L = log_normalize(ref.X, counts)
    Ld = L.toarray() if sp.issparse(L) else np.asarray(L)
    cand = np.argsort(-Ld.var(axis=0), kind="stable")[:200]
    coords = np.asarray(ref.obsm["spatial"], dtype=np.float64)
    k = min(11, coords.shape[0])
    _, nn = cKDTree(coords).query(coords, k=k)
    best, best_r = int(cand[0]), -np.inf
    for g in cand:
        x = Ld[:, g]
        if x.std() == 0:
            continue
        neigh = x[nn[:, 1:]].mean(axis=1)
        if neigh.std() == 0:
            continue
        r = float(np.corrcoef(x, neigh)[0, 1])
        if r > best_r:
            best, best_r = int(g), r
    Lq = log_normalize(query.X, counts)
    vals = np.asarray(Lq[:, best].toarray() if sp.issparse(Lq) else Lq[:, best]).ravel()
    return f"{ref.var_names[best]} (log expression)", vals, False


def _pick_panels(
    pred: dict[str, np.ndarray], summary: pd.DataFrame, task: str, unit: str
) -> list[str]:
    """Best dpvae variant and knn_regression; other methods fill in when those are missing."""
    sub = summary[(summary["task"] == task) & (summary["unit"] == unit)]
    score = dict(zip(sub["method"], sub["dist_pearson_mean"]))
    dp = [m for m in pred if m.startswith("dpvae")]
    panels = []
    if dp:
        panels.append(max(dp, key=lambda m: np.nan_to_num(score.get(m, -np.inf), nan=-np.inf)))
    if "knn_regression" in pred:
        panels.append("knn_regression")
    for m in pred:
        if len(panels) >= 2:
            break
        if m not in panels:
            panels.append(m)
    return panels


def plot_unit(plot: dict[str, Any], summary: pd.DataFrame, out_dir: Path) -> Path:
    """True versus predicted query coordinates (one seed) for one unit, as a PNG.

    Panels: true coordinates, then the best dpvae variant and knn_regression (other methods when
    those are missing); anchored units mark the anchors (x) on every panel. Transfer predictions and frame-free methods are shown after the best
    similarity alignment to the truth. 3-D data are projected on the plane of the true
    coordinates' two principal axes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task, unit = plot["task"], plot["unit"]
    ref, query = plot["ref"], plot["query"]
    T = np.asarray(query.obsm["spatial"], dtype=np.float64)
    panels = _pick_panels(plot["pred"], summary, task, unit)
    label, values, categorical = _colouring(ref, query)
    sub = summary[(summary["task"] == task) & (summary["unit"] == unit)]
    score = dict(zip(sub["method"], sub["dist_pearson_mean"]))

    seed_score = plot.get("score", {})

    n = 1 + len(panels)
    cats: list[str] = sorted(set(values)) if categorical else []
    # the class legend goes outside the axes; savefig(bbox_inches="tight") makes room for it
    fig, axes = plt.subplots(
        1, n, figsize=(4.8 * n + (0 if categorical else 0.9), 4.8), squeeze=False
    )
    axes = axes[0]
    size = float(np.clip(8000.0 / max(T.shape[0], 1), 2.0, 40.0))
    colour_of: dict[str, Any] = {}
    if categorical:
        palette = [
            plt.get_cmap(name)(i) for name in ("tab20", "tab20b", "tab20c") for i in range(20)
        ]
        colour_of = {c: palette[i % len(palette)] for i, c in enumerate(cats)}
        colours: Any = [colour_of[v] for v in values]
    else:
        colours = values
    mappable = None
    # 3-D data: show the plane of the true coordinates' two main axes
    centre = T.mean(axis=0)
    axes_2d = np.linalg.svd(T - centre, full_matrices=False)[2][:2].T if T.shape[1] > 2 else None
    for ax, (title, P) in zip(axes, [("truth", T)] + [(m, plot["pred"][m]) for m in panels]):
        note = ""
        if title != "truth" and (task == "transfer" or title in FRAME_FREE):  # anchored: B's frame
            P = _align(P, T)
            note = " (aligned)"
        if axes_2d is not None:
            P = (P - centre) @ axes_2d
        kw: dict[str, Any] = {"s": size, "linewidths": 0}
        if categorical:
            ax.scatter(P[:, 0], P[:, 1], c=colours, **kw)
        else:
            mappable = ax.scatter(P[:, 0], P[:, 1], c=colours, cmap="viridis", **kw)
        anchors = plot.get("anchors")
        if anchors is not None:  # the anchored task: where the anchors are, on every panel
            A = (anchors - centre) @ axes_2d if axes_2d is not None else anchors
            ax.scatter(A[:, 0], A[:, 1], marker="x", c="k", s=max(size, 12.0), linewidths=0.8)
        if title == "truth":
            extra = "" if anchors is None else f"; x: {len(anchors)} anchors"
            ax.set_title(f"true ({T.shape[0]} query cells{extra})", fontsize=10)
        else:
            here = seed_score.get(title, float("nan"))
            mean = score.get(title, float("nan"))
            text = f"{title}{note}"
            if not math.isnan(here):
                text += f"\ndist_pearson {here:.3f} (seed mean {mean:.3f})"
            ax.set_title(text, fontsize=10)
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_xticks([])
        ax.set_yticks([])
    if categorical:
        handles = [
            plt.Line2D([], [], marker="o", ls="", color=colour_of[c], label=c[:24]) for c in cats
        ]
        fig.legend(
            handles=handles,
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            fontsize=7,
            title=label,
            frameon=False,
            ncol=1 if len(cats) <= 20 else 2,
        )
    elif mappable is not None:
        fig.colorbar(mappable, ax=list(axes), shrink=0.8, label=label)
    dims = " (3-D, main plane of the truth)" if T.shape[1] > 2 else ""
    fig.suptitle(f"{task}: {unit}, seed {plot['seed']}{dims}", fontsize=11, y=1.03)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{task}__{_slug(unit)}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------

SUMMARY = """
Run the spatial-reconstruction protocol of ../shared/BENCHMARK.md: hygiene, impute splits,
transfer pairs and anchored pairs (a few cells of the new section with known positions), dp-VAE
(through dpvae.api) and the comparators on the same splits, each run in its own process with a
timeout. Writes OUT/results.csv (one row per run), OUT/results.md
(mean ± sd over seeds per task, unit and method), OUT/figures/*.png and OUT/predictions/*.npy.
"""


def work(cfg: DictConfig) -> int:
    """Run the benchmark of a composed ``protocol.yaml`` configuration; return the exit status.

    Raises:
        DPVAEError: a bad value (see :func:`config_from`) or unusable data.
    """
    bench = config_from(cfg)
    t0 = time.perf_counter()
    print(
        f"benchmark: {len(bench.impute_units)} impute unit(s), {len(bench.transfer_units)} "
        f"transfer pair(s), {len(bench.anchored_units)} anchored unit(s), methods {','.join(bench.methods)}, seeds "
        f"{','.join(map(str, bench.seeds))} -> {bench.out}",
        flush=True,
    )
    run_benchmark(bench, log=lambda s: print(s, flush=True))
    print(
        f"done in {time.perf_counter() - t0:.0f} s: {bench.out / 'results.csv'}, "
        f"{bench.out / 'results.md'}, {bench.out / 'figures'}",
        flush=True,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for a usage or data error)."""
    from dpvae.cli import command

    return command("python -m benchmarks.protocol", SUMMARY, CONF_DIR, ROOT_FILE, work)(argv)


if __name__ == "__main__":
    sys.exit(main())
