"""Shared fixtures: real data (embedded osmFISH always; ../shared/data when present)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from dpvae.data import embedded_path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DPVAE_SHARED_DATA", ROOT.parent / "shared" / "data"))


def train_process(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run ``python train.py ARGS`` in a fresh process (in ``cwd``, with ``env``); assert it
    succeeded, showing its stderr's tail otherwise."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def shared_file(name: str) -> Path:
    """Path of a dataset in ../shared/data, or skip the test saying why."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"needs {path} (the project's shared datasets, absent in a user's clone)")
    return path


def run_train(args: list[str]) -> Path:
    """Run the training command in this process (as ``python train.py ARGS``); return run_dir."""
    from dpvae.cli import train_main

    code = train_main([*args, "trainer.enable_progress_bar=false"])
    assert code == 0, f"training failed with exit status {code}"
    run_dir = [a.split("=", 1)[1] for a in args if a.startswith("run_dir=")]
    return Path(run_dir[-1]).resolve()


@pytest.fixture(scope="session")
def osmfish_run(osmfish: ad.AnnData, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A short run on 80% of the embedded osmFISH (the protocol's split, seed 0); the other 20%
    is a query with its true coordinates."""
    perm = np.random.default_rng(0).permutation(osmfish.n_obs)
    n_ref = round(0.8 * osmfish.n_obs)
    tmp = tmp_path_factory.mktemp("osmfish_run")
    ref, query = tmp / "ref.h5ad", tmp / "query.h5ad"
    osmfish[np.sort(perm[:n_ref])].copy().write_h5ad(ref)
    osmfish[np.sort(perm[n_ref:])].copy().write_h5ad(query)
    run_dir = run_train(
        [
            f"data.reference={ref}",
            f"run_dir={tmp / 'run'}",
            "logger=none",
            "trainer.max_epochs=12",
            "model.warmup_epochs=3",
            "callbacks.spatial.every_n_epochs=100",
        ]
    )
    return {"ref": ref, "query": query, "run": run_dir, "tmp": tmp}


@pytest.fixture(scope="session")
def osmfish() -> ad.AnnData:
    """The embedded osmFISH dataset (real data, always available)."""
    return ad.read_h5ad(embedded_path("osmfish"))


@pytest.fixture(scope="session")
def osmfish_small(osmfish: ad.AnnData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A spatially contiguous 1200-cell piece of osmFISH written as .h5ad (fast to train on)."""
    coords = osmfish.obsm["spatial"]
    center = np.median(coords, axis=0)
    order = np.argsort(np.linalg.norm(coords - center, axis=1))[:1200]
    sub = osmfish[np.sort(order)].copy()
    path = tmp_path_factory.mktemp("data") / "osmfish_small.h5ad"
    sub.write_h5ad(path)
    return path
