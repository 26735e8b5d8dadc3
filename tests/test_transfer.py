"""Transfer to a new section on real data (DLPFC 151673 -> 151674, the benchmark's dev pair)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

import dpvae
from dpvae.metrics import score_coordinates
from tests.conftest import shared_file


def _section(name: str, genes: list[str] | None = None) -> ad.AnnData:
    adata = ad.read_h5ad(shared_file(name))
    if genes is not None:
        adata = adata[:, genes].copy()
    total = np.asarray(adata.X.sum(axis=1)).ravel()
    return adata[total > 0].copy()


@pytest.mark.slow
def test_align_query_removes_the_section_shift() -> None:
    """Centring the new section on the reference (align_query) improves its placement.

    Measured over three training seeds of the full model: dist_pearson 0.61 -> 0.68. Here 30
    epochs, seed 0; the assertion asks for a gain of at least 0.02 and a useful placement."""
    ref = _section("dlpfc_visium_151673.h5ad")
    query = _section("dlpfc_visium_151674.h5ad")
    shared = [g for g in ref.var_names if g in set(query.var_names)]
    ref, query = ref[:, shared].copy(), query[:, shared].copy()
    truth = np.asarray(query.obsm["spatial"], dtype=np.float64)
    del query.obsm["spatial"]
    model = dpvae.fit(ref, "seed=0", "data.val_fraction=0", "trainer.max_epochs=30")
    scores = {}
    for align in (False, True):
        coords = model.predict(query, align_query=align)
        scores[align] = score_coordinates(coords, truth, "transfer")["dist_pearson"]
    assert scores[True] > scores[False] + 0.02 and scores[True] > 0.55, scores
