"""Prediction: the command and the Python API on real data, bad queries, no data lost."""

from __future__ import annotations

import hashlib
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import train
from dpvae import predict
from dpvae.errors import DPVAEError
from tests.conftest import shared_file


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def merfish_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Train on 80% of MERFISH bregma 0.21 (protocol split, seed 0); the other 20% is the query."""
    src = ad.read_h5ad(shared_file("merfish_hypothalamus_animal1_bregma0.21.h5ad"))
    perm = np.random.default_rng(0).permutation(src.n_obs)
    n_ref = round(0.8 * src.n_obs)
    tmp = tmp_path_factory.mktemp("merfish")
    ref, query = tmp / "ref.h5ad", tmp / "query.h5ad"
    src[np.sort(perm[:n_ref])].copy().write_h5ad(ref)
    src[np.sort(perm[n_ref:])].copy().write_h5ad(query)
    run_dir = train.run(
        [
            f"data.reference={ref}",
            f"run_dir={tmp / 'run'}",
            "logger=none",
            "trainer.max_epochs=8",
            "model.warmup_epochs=2",
            "trainer.enable_progress_bar=false",
            "callbacks.spatial.every_n_epochs=100",
        ]
    )
    return {"ref": ref, "query": query, "run": run_dir, "tmp": tmp}


def test_predict_command_round_trip(
    merfish_run: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Measured after 8 epochs (split seeds 0, 1): impute dist_pearson 0.364, 0.363."""
    query, out = merfish_run["query"], merfish_run["tmp"] / "pred.h5ad"
    before = _md5(query)
    code = predict.main(
        [
            f"checkpoint={merfish_run['run'] / 'model.ckpt'}",
            f"query={query}",
            f"output={out}",
            "plot=Cell_class",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert _md5(query) == before  # the query file is untouched
    res = ad.read_h5ad(out)
    src = ad.read_h5ad(query)
    assert res.n_obs == src.n_obs and res.obsm["spatial_dpvae"].shape == (src.n_obs, 2)
    assert res.obsm["X_dpvae"].shape[0] == src.n_obs
    info = res.uns["dpvae"]
    assert info["mode"] == "impute" and len(info["genes"]) > 100 and info["lambda"] > 0
    assert info["scores"]["dist_pearson"] > 0.31
    # predictions land in the reference frame: near the true positions on average
    err = np.median(np.linalg.norm(res.obsm["spatial_dpvae"] - src.obsm["spatial"], axis=1))
    spread = np.sqrt(((src.obsm["spatial"] - src.obsm["spatial"].mean(0)) ** 2).sum(1).mean())
    assert err < 0.8 * spread
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "dist_pearson=" in capsys.readouterr().out


def test_predict_python_api_reconstruct(merfish_run: dict[str, Path]) -> None:
    model = predict.load_model(merfish_run["run"] / "model.ckpt")
    query = ad.read_h5ad(merfish_run["query"])
    out = predict.predict_coordinates(model, query, mode="reconstruct")
    assert out.obsm["spatial_dpvae"].shape == (query.n_obs, 2)
    # measured (seeds 0, 1): 0.332, 0.323
    assert out.uns["dpvae"]["scores"]["dist_pearson"] > 0.27
    assert "spatial_dpvae" not in query.obsm  # the input object is not modified


def test_missing_genes_are_zero_filled_with_a_count(merfish_run: dict[str, Path]) -> None:
    model = predict.load_model(merfish_run["run"] / "model.ckpt")
    query = ad.read_h5ad(merfish_run["query"])
    keep = [g for g in query.var_names if g not in set(model.genes[:7])]
    with pytest.warns(UserWarning, match="7 of the model's"):
        out = predict.predict_coordinates(model, query[:, keep].copy())
    assert out.uns["dpvae"]["n_genes_missing"] == 7


def test_bad_queries(
    merfish_run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = merfish_run["run"] / "model.ckpt"
    query = ad.read_h5ad(merfish_run["query"])
    renamed = query.copy()
    renamed.var_names = [f"x{i}" for i in range(renamed.n_vars)]
    renamed.write_h5ad(tmp_path / "nogenes.h5ad")
    query[:0].copy().write_h5ad(tmp_path / "empty.h5ad")
    cases = {
        "nogenes.h5ad": "shares no gene",
        "empty.h5ad": "has no cells",
        "absent.h5ad": "no such file",
    }
    for name, message in cases.items():
        code = predict.main(
            [f"checkpoint={ckpt}", f"query={tmp_path / name}", f"output={tmp_path / 'out.h5ad'}"]
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
        assert not (tmp_path / "out.h5ad").exists()
    code = predict.main(
        [
            f"checkpoint={tmp_path / 'nope.ckpt'}",
            f"query={merfish_run['query']}",
            f"output={tmp_path / 'out.h5ad'}",
        ]
    )
    assert code == 2 and "no such checkpoint" in capsys.readouterr().err
    with pytest.raises(DPVAEError, match="unknown key"):
        predict._parse(["checkpoint=a", "query=b", "output=c", "bogus=1"])


def test_output_is_never_half_written(
    merfish_run: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "pred.h5ad"
    out.write_bytes(b"an earlier result")
    args = [
        f"checkpoint={merfish_run['run'] / 'model.ckpt'}",
        f"query={merfish_run['query']}",
        f"output={out}",
    ]
    assert predict.main(args) == 2  # refuses to replace an existing file by default
    assert "exists" in capsys.readouterr().err

    def crash(self: ad.AnnData, path: str, *a: object, **k: object) -> None:
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ad.AnnData, "write_h5ad", crash)
    with pytest.raises(KeyboardInterrupt):
        predict.main([*args, "overwrite=true"])
    assert out.read_bytes() == b"an earlier result"
    assert [p.name for p in tmp_path.iterdir()] == ["pred.h5ad"]  # no temporary file left


def test_cli_n_iter_reaches_the_solver(merfish_run: dict[str, Path]) -> None:
    ckpt, query, tmp = merfish_run["run"] / "model.ckpt", merfish_run["query"], merfish_run["tmp"]
    args = [f"checkpoint={ckpt}", f"query={query}"]
    assert predict.main([*args, f"output={tmp / 'mean.h5ad'}", "n_iter=0"]) == 0
    assert predict.main([*args, f"output={tmp / 'stress.h5ad'}", "n_iter=30"]) == 0
    mean = ad.read_h5ad(tmp / "mean.h5ad").obsm["spatial_dpvae"]
    stress = ad.read_h5ad(tmp / "stress.h5ad").obsm["spatial_dpvae"]
    assert np.abs(mean - stress).max() > 1e-3


def test_neighbours_use_latent_and_expression_pcs(osmfish_small: Path, tmp_path: Path) -> None:
    """With data.neighbour_pcs, embedding.h5ad carries the reference's expression PCs and
    prediction joins them to the latent code (expression_weight=0 turns that off)."""
    src = ad.read_h5ad(osmfish_small)
    ref, query = src[:900].copy(), src[900:].copy()
    ref.write_h5ad(tmp_path / "ref.h5ad")
    run_dir = train.run(
        [
            f"data.reference={tmp_path / 'ref.h5ad'}",
            f"run_dir={tmp_path / 'run'}",
            "logger=none",
            "trainer.max_epochs=2",
            "model.warmup_epochs=1",
            "data.neighbour_pcs=20",
            "trainer.enable_progress_bar=false",
        ]
    )
    emb = ad.read_h5ad(run_dir / "embedding.h5ad")
    model = predict.load_model(run_dir / "model.ckpt")
    assert model.transform.neighbour_pcs == 20
    assert emb.obsm["X_expr_pcs"].shape == (emb.n_obs, 20)
    joint = predict.predict_coordinates(model, query).obsm["spatial_dpvae"]
    latent_only = predict.predict_coordinates(model, query, expression_weight=0).obsm[
        "spatial_dpvae"
    ]
    assert np.abs(joint - latent_only).max() > 1e-3
    # the run's embedding calibrates its training cells against its held-out ones ...
    plain = emb.copy()
    del plain.obs["split"]
    uncalibrated = predict.predict_coordinates(model, query, reference=plain).obsm["spatial_dpvae"]
    assert np.abs(joint - uncalibrated).max() > 1e-3
    # ... an expression reference is embedded as new cells: what the uncalibrated codes give
    from_expression = predict.predict_coordinates(
        model, query, reference=ref[emb.obs_names].copy()
    ).obsm["spatial_dpvae"]
    np.testing.assert_allclose(from_expression, uncalibrated, rtol=1e-4, atol=1e-3)
