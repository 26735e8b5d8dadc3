"""Doubtful input gets a clear warning (and goes on) or one error line (and writes nothing)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import dpvae
from dpvae.cli import predict_main, train_main
from dpvae.errors import DataError, DPVAEWarning


@pytest.fixture(scope="module")
def model(osmfish_run: dict[str, Path]) -> dpvae.Model:
    return dpvae.load(osmfish_run["run"])


@pytest.fixture()
def query(osmfish_run: dict[str, Path]) -> ad.AnnData:
    q = ad.read_h5ad(osmfish_run["query"])
    return q[np.asarray(q.X.sum(axis=1)).ravel() > 0].copy()


def _cli(args: list[str], out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = predict_main([*args, f"output={out}"])
    return code, capsys.readouterr().err.strip().splitlines()


def test_repeated_query_names_are_made_unique(model: dpvae.Model, query: ad.AnnData) -> None:
    query.obs_names = ["same"] * 3 + list(query.obs_names[3:])
    with pytest.warns(DPVAEWarning, match="2 query cell names are repeated"):
        out = model.annotate(query)
    assert out.obs_names.is_unique


def test_a_query_of_reference_cells_is_flagged_in_sample(
    model: dpvae.Model, osmfish_run: dict[str, Path]
) -> None:
    ref = ad.read_h5ad(osmfish_run["ref"])[:200].copy()
    with pytest.warns(DPVAEWarning, match="are reference cells of this run"):
        model.predict(ref)


def test_too_many_missing_genes_is_an_error_unless_allowed(
    model: dpvae.Model,
    query: ad.AnnData,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    few = query[:, model.genes[:10]].copy()  # 23 of 33 genes missing
    few.write_h5ad(tmp_path / "few.h5ad")
    args = [f"checkpoint={model.module.checkpoint_path}", f"query={tmp_path / 'few.h5ad'}"]
    code, err = _cli(args, tmp_path / "out.h5ad", capsys)
    assert code == 2 and len(err) == 1 and "lacks 23 of the model's 33 genes" in err[0]
    assert not (tmp_path / "out.h5ad").exists()
    code, err = _cli([*args, "allow_missing_genes=true"], tmp_path / "out.h5ad", capsys)
    assert code == 0 and any("23 of the model's 33 genes are missing" in e for e in err)


def test_cells_without_expression_get_nan_and_are_left_out_of_the_scores(
    model: dpvae.Model, query: ad.AnnData
) -> None:
    x = query.X.toarray() if sp.issparse(query.X) else np.array(query.X)
    x[:5] = 0
    query.X = x
    with pytest.warns(DPVAEWarning, match="5 query cells have no expression"):
        out = model.annotate(query)
    xy = out.obsm["spatial_dpvae"]
    assert np.isnan(xy[:5]).all() and np.isfinite(xy[5:]).all()
    scores = out.uns["dpvae"]["scores"]
    assert all(np.isfinite(v) for v in scores.values()) and scores["dist_pearson"] > 0.3


def test_k_above_the_reference_size_is_said(
    model: dpvae.Model, osmfish_run: dict[str, Path], query: ad.AnnData
) -> None:
    tiny = ad.read_h5ad(osmfish_run["ref"])[:5].copy()
    with pytest.warns(DPVAEWarning, match="k=8 is more than the 5 reference cells"):
        xy = model.predict(query[:20].copy(), reference=tiny)
    assert np.isfinite(xy).all()


def test_negative_values_for_a_count_model_are_an_error(
    model: dpvae.Model, query: ad.AnnData
) -> None:
    query.X = (query.X.toarray() if sp.issparse(query.X) else query.X) - 1.0
    with pytest.raises(DataError, match="negative values"):
        model.predict(query)


def test_training_says_what_it_does_with_doubtful_references(
    osmfish_small: Path, tmp_path: Path
) -> None:
    src = ad.read_h5ad(osmfish_small)
    src.obs_names = ["c0"] * 4 + list(src.obs_names[4:])
    src.write_h5ad(tmp_path / "dup.h5ad")
    args = ["logger=none", "trainer.max_epochs=1", "trainer.enable_progress_bar=false"]
    with pytest.warns(DPVAEWarning, match="3 reference cell names are repeated"):
        assert (
            train_main(
                [f"data.reference={tmp_path / 'dup.h5ad'}", f"run_dir={tmp_path / 'a'}", *args]
            )
            == 0
        )
    assert ad.read_h5ad(tmp_path / "a" / "embedding.h5ad").obs_names.is_unique
    neg = src.copy()
    neg.obs_names_make_unique()
    x = neg.X.toarray() if sp.issparse(neg.X) else np.array(neg.X)
    neg.X = np.log1p(x) - 1.0  # z-scored-like values
    neg.write_h5ad(tmp_path / "neg.h5ad")
    with pytest.warns(DPVAEWarning, match="negative values .* no total-count normalisation"):
        assert (
            train_main(
                [f"data.reference={tmp_path / 'neg.h5ad'}", f"run_dir={tmp_path / 'b'}", *args]
            )
            == 0
        )
