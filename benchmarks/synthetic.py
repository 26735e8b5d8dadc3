"""A synthetic spatial count reference of any size, written without holding its matrix in memory.

Run from the repository root of a checkout (keys and defaults: ``benchmarks/conf/synthetic.yaml``,
``--help`` prints them)::

    python -m benchmarks.synthetic out=synth.h5ad n_cells=1000000 n_genes=2000 density=0.1
    python -m benchmarks.synthetic out=panel.h5ad n_cells=200000 n_genes=300 dense=true
    python -m benchmarks.synthetic out=serial.h5ad n_cells=50000 sections=3   # serial_s0.h5ad ...

The tissue is a square of side ``10 * sqrt(n_cells)`` (about one cell per 100 square units) on
which eight smooth spatial programmes are defined: two linear gradients, a layered (cosine) band
pattern and five Gaussian domains. Every gene loads on one or two programmes (a fifth of the genes
on none: spatially flat), so its expected count is ``rate_g * exp(programme effect) * library``
with a log-normal cell library size. A cell detects a gene with probability ``1 - exp(-lambda)``
and a detected gene's count is ``1 + Poisson(lambda)``: integer counts, about ``density`` non-zeros
overall (per-gene detection rates are log-normal around it, calibrated on a pilot sample of
positions). The tissue (programmes, gene loadings, rates) depends on ``seed`` only; cell positions
and counts of section ``s`` on ``(seed, s)``, so the sections of one call are independent samples of
the same tissue.

Output: ``sections=1`` writes ``out`` itself; ``sections=S > 1`` writes ``S`` files next to it,
``out`` with ``_s0.h5ad``, ``_s1.h5ad``, ... in place of ``.h5ad``. Section 0 is in the tissue's
frame; section ``s > 0`` is rotated by a random angle about the tissue's centre and shifted by up to
half the side (its own coordinate frame, as serial sections are). Each file holds ``X`` (CSR
float32 of integer values; ``dense=true``: a dense float32 array, for MERFISH-like panels),
``obs_names`` ``s{section}_c{i}``, ``var_names`` ``g{j}`` with ``var['programme']`` (the gene's
strongest programme, -1 for flat genes), ``obsm['spatial']`` (float64, 2-D) and
``uns['synthetic']`` (the parameters and the section's frame). ``X`` is generated and appended
4096 rows at a time (anndata's ``write_elem`` and ``sparse_dataset(...).append``), so memory stays
at a few hundred MB whatever ``n_cells``; each file is written under a temporary name and renamed
when complete.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from dpvae.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

CONF_DIR = Path(__file__).resolve().parent / "conf"
ROOT_FILE = "synthetic.yaml"
CHUNK = 4096
N_PROGRAMMES = 8
SUMMARY = """
Write a synthetic spatial count reference (.h5ad, obsm['spatial']) chunk by chunk: smooth spatial
expression programmes, integer counts at about `density` non-zeros, CSR (or dense) X; sections=S
writes S files OUT_s0.h5ad ... in shifted and rotated coordinate frames.
"""


@dataclass(frozen=True)
class Tissue:
    """The spatial programmes and the genes' responses to them (everything but the cells)."""

    centres: np.ndarray  # (5, 2) Gaussian domain centres in the unit square
    widths: np.ndarray  # (5,)
    phase: float  # of the layered band pattern
    offset: np.ndarray  # (N_PROGRAMMES,) programme means over the square (subtracted)
    loadings: np.ndarray  # (N_PROGRAMMES, n_genes) float32
    rate: np.ndarray  # (n_genes,) float32, lambda at programme effect 0 and library 1
    programme: np.ndarray  # (n_genes,) int, strongest programme or -1

    def fields(self, u: np.ndarray) -> np.ndarray:
        """(n, N_PROGRAMMES) programme values at unit-square positions ``u`` (n, 2), centred."""
        import numpy as np

        d2 = ((u[:, None, :] - self.centres[None]) ** 2).sum(-1)
        cols = [
            u[:, :1],
            u[:, 1:],
            np.cos(2 * np.pi * 3 * u[:, :1] + self.phase),
            np.exp(-d2 / (2 * self.widths**2)),
        ]
        return np.concatenate(cols, axis=1) - self.offset

    def rates(self, u: np.ndarray, library: np.ndarray) -> np.ndarray:
        """(n, n_genes) float32 expected counts of cells at ``u`` with library sizes ``library``."""
        import numpy as np

        eff = self.fields(u).astype(np.float32) @ self.loadings
        np.exp(eff, out=eff)
        eff *= self.rate[None, :]
        eff *= library.astype(np.float32)[:, None]
        return eff


def make_tissue(seed: int, n_genes: int, density: float) -> Tissue:
    """The tissue of ``seed``: programmes, loadings and per-gene rates calibrated to ``density``."""
    import numpy as np

    rng = np.random.default_rng([seed, 0])
    centres = rng.uniform(0.15, 0.85, (N_PROGRAMMES - 3, 2))
    widths = rng.uniform(0.08, 0.2, N_PROGRAMMES - 3)
    phase = float(rng.uniform(0, 2 * np.pi))
    zero = Tissue(
        centres, widths, phase, np.zeros(N_PROGRAMMES), np.zeros((1, 1)), *[np.zeros(1)] * 2
    )
    grid = (np.stack(np.meshgrid(*[np.linspace(0, 1, 64)] * 2), -1).reshape(-1, 2) + 0.5 / 64) % 1
    f = zero.fields(grid)
    offset = f.mean(0)
    scale = f.max(0) - f.min(0)  # a loading w moves the log-rate by |w| across the tissue
    loadings = np.zeros((N_PROGRAMMES, n_genes))
    programme = np.full(n_genes, -1)
    for g in range(n_genes):
        if rng.random() < 0.2:
            continue  # spatially flat gene
        ks = rng.choice(N_PROGRAMMES, size=int(rng.integers(1, 3)), replace=False)
        w = rng.choice([-1.0, 1.0], len(ks)) * rng.uniform(1.5, 3.5, len(ks))
        loadings[ks, g] = w / scale[ks]
        programme[g] = ks[int(np.argmax(np.abs(w)))]
    target = np.clip(density * np.exp(rng.normal(-0.25, 0.7, n_genes)), 0.002, 0.6)
    for _ in range(3):  # mean detection rate of the clipped log-normal to `density`
        target = np.clip(target * density / target.mean(), 0.002, 0.6)
    tissue = Tissue(
        centres,
        widths,
        phase,
        offset,
        loadings.astype(np.float32),
        np.ones(n_genes, np.float32),
        programme,
    )
    # calibrate each gene's rate so that its detection rate over the tissue is its target
    pilot = np.random.default_rng([seed, 0, 1])
    u = pilot.random((4000, 2))
    lib = _library(pilot, len(u))
    shape = tissue.rates(u, lib).astype(np.float64)
    rate = -np.log1p(-target)
    for _ in range(30):
        detect = -np.expm1(-rate * shape).mean(0)
        rate *= target / np.maximum(detect, 1e-12)
    return Tissue(
        centres,
        widths,
        phase,
        offset,
        loadings.astype(np.float32),
        rate.astype(np.float32),
        programme,
    )


def _library(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.lognormal(0.0, 0.25, n)


def section_paths(out: str | Path, sections: int) -> list[Path]:
    """The files ``sections`` sections of ``out`` are written to (``out`` itself for one)."""
    out = Path(out)
    if sections == 1:
        return [out]
    stem = out.name[: -len(".h5ad")] if out.name.endswith(".h5ad") else out.name
    return [out.with_name(f"{stem}_s{s}.h5ad") for s in range(sections)]


def _frame(seed: int, section: int, side: float) -> tuple[float, np.ndarray]:
    import numpy as np

    if section == 0:
        return 0.0, np.zeros(2)
    rng = np.random.default_rng([seed, section + 1, 0])
    return float(rng.uniform(0.3, 2 * np.pi - 0.3)), rng.uniform(-0.5, 0.5, 2) * side


def write_section(
    path: Path,
    tissue: Tissue,
    n_cells: int,
    seed: int,
    section: int,
    dense: bool = False,
    own_frame: bool = True,
) -> Path:
    """Write one section of ``n_cells`` cells to ``path`` (atomically), ``CHUNK`` rows at a time.

    ``own_frame=False`` keeps a section ``s > 0`` in the tissue's frame (section 0's): new cells
    of the same tissue with coordinates comparable to section 0's (the scale benchmark's query).
    """
    import h5py
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp
    from anndata.io import sparse_dataset, write_elem

    n_genes = tissue.rate.shape[0]
    side = 10.0 * float(np.sqrt(n_cells))
    angle, shift = _frame(seed, section if own_frame else 0, side)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    rng = np.random.default_rng([seed, section + 1])
    coords = np.empty((n_cells, 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    nnz = 0
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["encoding-type"] = "anndata"
            f.attrs["encoding-version"] = "0.1.0"
            X: Any = None
            if dense:
                X = f.create_dataset(
                    "X", (n_cells, n_genes), np.float32, chunks=(min(n_cells, 256), n_genes)
                )
                X.attrs["encoding-type"] = "array"
                X.attrs["encoding-version"] = "0.2.0"
            for start in range(0, n_cells, CHUNK):
                stop = min(start + CHUNK, n_cells)
                u = rng.random((stop - start, 2))
                lam = tissue.rates(u, _library(rng, stop - start))
                hit = rng.random(lam.shape, dtype=np.float32) < -np.expm1(-lam)
                values = (1 + rng.poisson(lam[hit])).astype(np.float32)
                nnz += len(values)
                coords[start:stop] = (u * side - side / 2) @ rot.T + side / 2 + shift
                if dense:
                    block = np.zeros(lam.shape, np.float32)
                    block[hit] = values
                    X[start:stop] = block
                    continue
                indptr = np.zeros(stop - start + 1, np.int64)
                np.cumsum(hit.sum(1), out=indptr[1:])
                cols = np.nonzero(hit)[1].astype(np.int32)  # row-major: CSR order
                block = sp.csr_matrix((values, cols, indptr), shape=lam.shape)
                if X is None:
                    write_elem(f, "X", block)
                    X = sparse_dataset(f["X"])
                else:
                    X.append(block)
            names = pd.Index([f"s{section}_c{i}" for i in range(n_cells)])
            write_elem(f, "obs", pd.DataFrame(index=names))
            var = pd.DataFrame(
                {"programme": tissue.programme}, index=[f"g{j}" for j in range(n_genes)]
            )
            write_elem(f, "var", var)
            write_elem(f, "obsm", {"spatial": coords})
            for key in ("varm", "obsp", "varp", "layers"):
                write_elem(f, key, {})
            info = {
                "seed": seed,
                "section": section,
                "n_cells": n_cells,
                "n_genes": n_genes,
                "density": nnz / (n_cells * n_genes),
                "dense": dense,
                "side": side,
                "angle": angle,
                "shift": shift,
            }
            write_elem(f, "uns", {"synthetic": info})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_reference(
    out: str | Path,
    n_cells: int,
    n_genes: int = 2000,
    density: float = 0.1,
    sections: int = 1,
    seed: int = 0,
    dense: bool = False,
) -> list[Path]:
    """Write ``sections`` synthetic sections of ``n_cells`` cells each; returns their paths."""
    tissue = make_tissue(seed, n_genes, density)
    paths = section_paths(out, sections)
    return [write_section(p, tissue, n_cells, seed, s, dense) for s, p in enumerate(paths)]


def config_from(cfg: DictConfig) -> dict[str, Any]:
    """The keyword arguments of :func:`write_reference` of a composed ``synthetic.yaml``.

    Raises:
        ConfigError: an out that is not ``.h5ad``, a size below 1, a density outside (0, 0.5].
    """
    out = str(cfg.out)
    if not out.endswith(".h5ad"):
        raise ConfigError(f"out must name an .h5ad file, got {out!r}")
    for key in ("n_cells", "n_genes", "sections"):
        if int(cfg[key]) < 1:
            raise ConfigError(f"{key} must be a positive integer, got {cfg[key]}")
    if not 0 < float(cfg.density) <= 0.5:
        raise ConfigError(f"density must be in (0, 0.5], got {cfg.density}")
    return {
        "out": out,
        "n_cells": int(cfg.n_cells),
        "n_genes": int(cfg.n_genes),
        "density": float(cfg.density),
        "sections": int(cfg.sections),
        "seed": int(cfg.seed),
        "dense": bool(cfg.dense),
    }


def work(cfg: DictConfig) -> int:
    """Write the files of a composed configuration and print one line per file."""
    import time

    kwargs = config_from(cfg)
    start = time.perf_counter()
    for path in write_reference(**kwargs):
        size = path.stat().st_size / 2**20
        print(f"wrote {path} ({kwargs['n_cells']:,} x {kwargs['n_genes']:,}, {size:,.0f} MB)")
    print(f"{time.perf_counter() - start:.1f} s", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for a usage error)."""
    from dpvae.cli import command

    return command("python -m benchmarks.synthetic", SUMMARY, CONF_DIR, ROOT_FILE, work)(argv)


if __name__ == "__main__":
    sys.exit(main())
