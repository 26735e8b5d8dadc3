"""Are dpvae's placements unchanged? Save ``fit_predict``'s output on a few units, or compare.

A change that should not touch the method (a refactor, logging, file handling) must leave every
prediction bit-identical; this command is how the project checks it, on the protocol's own splits
(keys and defaults: ``benchmarks/conf/identity.yaml``)::

    python -m benchmarks.identity out=before.npz                    # on the old commit
    python -m benchmarks.identity out=after.npz compare=before.npz  # on the new one

Exit status 1 when any unit differs (the largest absolute difference is printed per unit).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from dpvae.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent / "conf"
ROOT_FILE = "identity.yaml"
SUMMARY = """
Save dpvae's predictions (fit_predict, the benchmark's call) on a few protocol units, or compare
them with an earlier set: a change off the method's path must leave every placement bit-identical.
"""


def _unit(text: str) -> tuple[str, str, str, int]:
    try:
        data, task, seed = text.rsplit(":", 2)
        reference, _, query = data.partition("->")
        return reference, query, task, int(seed)
    except ValueError:
        raise ConfigError(
            f"a unit is DATASET:impute:SEED or A->B:transfer:SEED, got {text!r}"
        ) from None


def predictions(cfg: DictConfig) -> dict[str, Any]:
    """``fit_predict`` coordinates per unit, on the protocol's hygiene and splits."""
    import anndata as ad
    import torch

    from benchmarks import protocol as P
    from dpvae.api import fit_predict

    torch.set_num_threads(int(cfg.threads))
    data_dir = Path(cfg.data_dir).expanduser()
    out = {}
    for text in cfg.units:
        reference, query, task, seed = _unit(str(text))
        path = {k: data_dir / v for k, v in P.DATASETS.items()}
        if reference not in path or (query and query not in path):
            raise ConfigError(f"unknown dataset in {text!r}; valid: {', '.join(P.DATASETS)}")
        if task == "impute":
            section = P.hygiene(ad.read_h5ad(path[reference]), reference)
            ref_rows, query_rows = P.impute_split(section.n_obs, seed)
            ref, q = P.method_inputs(section[ref_rows].copy(), section[query_rows].copy())
        elif task == "transfer":
            a, b = P.hygiene_pair(ad.read_h5ad(path[reference]), ad.read_h5ad(path[query]))
            ref, q = P.method_inputs(a, b)
        else:
            raise ConfigError(f"task must be impute or transfer, got {task!r} in {text!r}")
        out[str(text)] = fit_predict(ref, q, task=task, seed=seed)
        print(f"{text}: {out[str(text)].shape[0]} cells placed", flush=True)
    return out


def work(cfg: DictConfig) -> int:
    import numpy as np

    out = Path(cfg.out).expanduser()
    if out.suffix != ".npz":
        raise ConfigError(f"out={out} must end in .npz")
    old: Any = None
    if cfg.compare is not None:
        compare = Path(cfg.compare).expanduser()
        if compare.resolve() == out.resolve():
            raise ConfigError("compare= must differ from out= (it would be overwritten)")
        if not compare.is_file():
            raise ConfigError(f"compare={compare}: no such file")
        old = dict(np.load(compare))
    new = predictions(cfg)
    np.savez(out, **new)
    if old is None:
        return 0
    differs = False
    for key, value in new.items():
        if key not in old:
            print(f"{key}: not in {cfg.compare}")
            differs = True
            continue
        shaped = old[key].shape == value.shape
        same = shaped and np.array_equal(old[key], value, equal_nan=True)
        gap = float(np.nanmax(np.abs(old[key] - value))) if shaped else np.inf
        differs |= not same
        print(f"{key}: " + ("identical" if same else f"differs (largest difference {gap:g})"))
    return 1 if differs else 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for a usage or data error)."""
    from dpvae.cli import command

    return command("python -m benchmarks.identity", SUMMARY, CONF_DIR, ROOT_FILE, work)(argv)


if __name__ == "__main__":
    sys.exit(main())
