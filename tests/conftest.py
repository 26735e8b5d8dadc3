"""Shared fixtures: real data (embedded osmFISH always; ../shared/data when present)."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from dpvae.data import embedded_path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DPVAE_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared_file(name: str) -> Path:
    """Path of a dataset in ../shared/data, or skip the test saying why."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"needs {path} (the project's shared datasets, absent in a user's clone)")
    return path


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
