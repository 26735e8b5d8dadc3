"""Prediction: the command and the Python API on the embedded osmFISH, bad queries, no data lost."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import dpvae
from dpvae import placement
from dpvae.cli import predict_main, train_main
from dpvae.errors import ConfigError, DataError, DPVAEWarning
from tests.conftest import ROOT, run_train


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_predict_command_round_trip(
    osmfish_run: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Measured after 12 epochs (split seed 0): impute dist_pearson MEASURED."""
    query, out = osmfish_run["query"], osmfish_run["tmp"] / "pred.h5ad"
    before = _md5(query)
    code = predict_main(
        [
            f"checkpoint={osmfish_run['run'] / 'model.ckpt'}",
            f"query={query}",
            f"output={out}",
            "plot=ClusterName",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert _md5(query) == before  # the query file is untouched
    res = ad.read_h5ad(out)
    src = ad.read_h5ad(query)
    assert res.n_obs == src.n_obs and res.obsm["spatial_dpvae"].shape == (src.n_obs, 2)
    assert res.obsm["X_dpvae"].shape[0] == src.n_obs
    info = res.uns["dpvae"]
    assert info["mode"] == "impute" and len(info["genes"]) == 33 and info["lambda"] > 0
    print("MEASURE impute", info["scores"])
    assert info["scores"]["dist_pearson"] > 0.45
    # cells without expression of the model's genes get NaN, the others a position
    empty = np.asarray(src.X.sum(axis=1)).ravel() == 0
    placed = np.isfinite(res.obsm["spatial_dpvae"]).all(axis=1)
    assert empty.any() and np.array_equal(placed, ~empty)
    assert info["n_cells_without_expression"] == int(empty.sum())
    # predictions land in the reference frame: near the true positions on average
    err = np.nanmedian(np.linalg.norm(res.obsm["spatial_dpvae"] - src.obsm["spatial"], axis=1))
    spread = np.sqrt(((src.obsm["spatial"] - src.obsm["spatial"].mean(0)) ** 2).sum(1).mean())
    assert err < 0.8 * spread
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "dist_pearson 0." in capsys.readouterr().out


def test_a_query_of_a_few_cells_with_positions_is_placed_and_scored(
    osmfish_run: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Five query cells that carry their true positions (a user checking a handful of cells):
    placed and scored as any query, knn10 left out (NaN: no cell has 10 others), no error."""
    query, out = osmfish_run["query"], osmfish_run["tmp"] / "five.h5ad"
    five = ad.read_h5ad(query)[:5].copy()
    five.write_h5ad(osmfish_run["tmp"] / "five_in.h5ad")
    code = predict_main(
        [
            f"checkpoint={osmfish_run['run'] / 'model.ckpt'}",
            f"query={osmfish_run['tmp'] / 'five_in.h5ad'}",
            f"output={out}",
        ]
    )
    assert code == 0, capsys.readouterr().err
    scores = ad.read_h5ad(out).uns["dpvae"]["scores"]
    assert np.isnan(scores["knn10"]) and np.isfinite(scores["median_error"])
    coords = dpvae.load(osmfish_run["run"]).predict(five)
    assert coords.shape == (5, 2) and np.isfinite(coords).all()


def test_predict_python_api_reconstruct(osmfish_run: dict[str, Path]) -> None:
    model = dpvae.load(osmfish_run["run"])
    query = ad.read_h5ad(osmfish_run["query"])
    out = model.annotate(query.copy(), mode="reconstruct")
    assert out.obsm["spatial_dpvae"].shape == (query.n_obs, 2)
    print("MEASURE reconstruct", out.uns["dpvae"]["scores"])
    assert out.uns["dpvae"]["scores"]["dist_pearson"] > 0.2
    assert "spatial_dpvae" not in query.obsm  # the input object is not modified


def test_missing_genes_are_zero_filled_with_a_count(osmfish_run: dict[str, Path]) -> None:
    model = dpvae.load(osmfish_run["run"] / "model.ckpt")
    query = ad.read_h5ad(osmfish_run["query"])
    keep = [g for g in query.var_names if g not in set(model.genes[:7])]
    with pytest.warns(UserWarning, match="7 of the model's"):
        out = model.annotate(query[:, keep].copy())
    assert out.uns["dpvae"]["n_genes_missing"] == 7


def test_bad_queries(
    osmfish_run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = osmfish_run["run"] / "model.ckpt"
    query_path = osmfish_run["query"]
    query = ad.read_h5ad(query_path)
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
        code = predict_main(
            [f"checkpoint={ckpt}", f"query={tmp_path / name}", f"output={tmp_path / 'out.h5ad'}"]
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
        assert not (tmp_path / "out.h5ad").exists()
    (tmp_path / "out.png").write_bytes(b"an earlier figure")
    args = [f"checkpoint={ckpt}", f"query={query_path}", f"output={tmp_path / 'out.h5ad'}"]
    assert predict_main([*args, "plot=ClusterName"]) == 2  # the figure would be replaced
    assert "out.png exists" in capsys.readouterr().err
    assert (tmp_path / "out.png").read_bytes() == b"an earlier figure"
    code = predict_main(
        [
            f"checkpoint={tmp_path / 'nope.ckpt'}",
            f"query={osmfish_run['query']}",
            f"output={tmp_path / 'out.h5ad'}",
        ]
    )
    assert code == 2 and "no such checkpoint" in capsys.readouterr().err
    for args, message in [
        (["checkpoint=a", "query=b", "output=c", "bogus=1"], "unknown key 'bogus'"),
        (
            [f"checkpoint={ckpt}", f"query={query_path}", f"output={tmp_path / 'o.h5ad'}", "k=0"],
            "k must be",
        ),
        (
            [f"checkpoint={ckpt}", f"query={query_path}", f"output={tmp_path / 'o.h5ad'}", "k=two"],
            "integer",
        ),
        (["query=b", "output=c"], "missing checkpoint="),
        (
            [
                f"checkpoint={ckpt}",
                f"query={query_path}",
                f"output={tmp_path / 'o.h5ad'}",
                "plot=Nope",
            ],
            "plot=Nope",
        ),
        (
            [
                f"checkpoint={ckpt}",
                f"query={query_path}",
                f"output={tmp_path / 'o.h5ad'}",
                "mode=reconstruct",
                "plot=dpvae_radius90",
            ],
            "mode=reconstruct places cells in their own frame, with no radius",
        ),
    ]:
        assert predict_main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o.h5ad").exists()


def test_output_is_never_half_written(
    osmfish_run: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "pred.h5ad"
    out.write_bytes(b"an earlier result")
    args = [
        f"checkpoint={osmfish_run['run'] / 'model.ckpt'}",
        f"query={osmfish_run['query']}",
        f"output={out}",
    ]
    assert predict_main(args) == 2  # refuses to replace an existing file by default
    assert "exists" in capsys.readouterr().err

    def crash(self: ad.AnnData, path: str, *a: object, **k: object) -> None:
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ad.AnnData, "write_h5ad", crash)
    assert predict_main([*args, "overwrite=true"]) == 130  # Ctrl-C: one line, status 130
    assert "interrupted" in capsys.readouterr().err
    assert out.read_bytes() == b"an earlier result"
    assert [p.name for p in tmp_path.iterdir()] == ["pred.h5ad"]  # no temporary file left


def test_no_radius_after_stress_majorisation_and_a_missing_truth_key_said(
    osmfish_run: dict[str, Path],
) -> None:
    query = ad.read_h5ad(osmfish_run["query"])[:200].copy()
    model = dpvae.load(osmfish_run["run"])
    with pytest.warns(DPVAEWarning, match="no dpvae_radius90: n_iter=5: the radius is calibrated"):
        out = model.annotate(query.copy(), n_iter=5)
    assert "radius" not in out.uns["dpvae"] and "dpvae_radius90" not in out.obs
    with pytest.warns(DPVAEWarning, match=r"no obsm\['xy'\] \(obsm keys: X_tsne_source, spatial\)"):
        out = model.annotate(query.copy(), spatial_key="xy")
    assert "scores" not in out.uns["dpvae"]


def test_cli_n_iter_reaches_the_solver(osmfish_run: dict[str, Path]) -> None:
    ckpt, query, tmp = osmfish_run["run"] / "model.ckpt", osmfish_run["query"], osmfish_run["tmp"]
    args = [f"checkpoint={ckpt}", f"query={query}"]
    assert predict_main([*args, f"output={tmp / 'mean.h5ad'}", "n_iter=0"]) == 0
    assert predict_main([*args, f"output={tmp / 'stress.h5ad'}", "n_iter=30"]) == 0
    mean = ad.read_h5ad(tmp / "mean.h5ad").obsm["spatial_dpvae"]
    stress = ad.read_h5ad(tmp / "stress.h5ad").obsm["spatial_dpvae"]
    assert np.nanmax(np.abs(mean - stress)) > 1e-3


def test_neighbours_use_latent_and_expression_pcs(osmfish_small: Path, tmp_path: Path) -> None:
    """With data.neighbour_pcs, embedding.h5ad carries the reference's expression PCs and
    prediction joins them to the latent code (expression_weight=0 turns that off)."""
    src = ad.read_h5ad(osmfish_small)
    ref, query = src[:900].copy(), src[900:].copy()
    ref.write_h5ad(tmp_path / "ref.h5ad")
    run_dir = run_train(
        [
            f"data.reference={tmp_path / 'ref.h5ad'}",
            f"run_dir={tmp_path / 'run'}",
            "logger=none",
            "trainer.max_epochs=2",
            "model.warmup_epochs=1",
            "data.neighbour_pcs=20",
        ]
    )
    emb = ad.read_h5ad(run_dir / "embedding.h5ad")
    model = dpvae.load(run_dir)
    assert model.module.transform.neighbour_pcs == 20
    assert emb.obsm["X_expr_pcs"].shape == (emb.n_obs, 20)
    joint = model.predict(query)
    latent_only = model.predict(query, expression_weight=0)
    assert np.nanmax(np.abs(joint - latent_only)) > 1e-3
    # the run's embedding calibrates its training cells against its held-out ones ...
    plain = emb.copy()
    del plain.obs["split"]
    uncalibrated = model.predict(query, reference=plain)
    assert np.nanmax(np.abs(joint - uncalibrated)) > 1e-3
    # ... an expression file of those same cells is recognised as the run's (names, positions
    # and codes) and calibrated as its embedding is ...
    from_expression = model.predict(query, reference=ref[emb.obs_names].copy())
    np.testing.assert_allclose(from_expression, joint, rtol=1e-4, atol=1e-3)
    # ... while cells at other positions are new cells: what the uncalibrated codes give
    moved = ref[emb.obs_names].copy()
    moved.obsm["spatial"] = moved.obsm["spatial"] + 1000.0
    shifted = model.predict(query, reference=moved) - 1000.0
    np.testing.assert_allclose(shifted, uncalibrated, rtol=1e-4, atol=1e-3)


def test_every_way_of_loading_a_run_predicts_the_same(osmfish_run: dict[str, Path]) -> None:
    """dpvae.load(run folder), dpvae.load(model.ckpt) and DPVAE.load_from_checkpoint all find
    the run's reference cells; a saved copy loads back to the same predictions."""
    from dpvae.module import DPVAE

    query = ad.read_h5ad(osmfish_run["query"])
    by_dir = dpvae.load(osmfish_run["run"]).predict(query)
    by_ckpt = dpvae.load(osmfish_run["run"] / "model.ckpt").predict(query)
    module = DPVAE.load_from_checkpoint(osmfish_run["run"] / "model.ckpt")
    bare = placement.predict(module, query).coords
    np.testing.assert_array_equal(by_dir, by_ckpt)
    np.testing.assert_array_equal(by_dir, bare)
    copy = dpvae.load(osmfish_run["run"]).save(osmfish_run["tmp"] / "copy")
    np.testing.assert_array_equal(dpvae.load(copy).predict(query), by_dir)
    with pytest.raises(Exception, match="already holds"):
        dpvae.load(copy).save(copy)


def test_a_loaded_model_is_the_trained_network_without_lightning(
    osmfish_run: dict[str, Path],
) -> None:
    """dpvae.load builds a Network (no Lightning) with the LightningModule's state, key for key,
    and the same latent codes; a checkpoint it cannot read is one DataError naming the file."""
    import torch

    from dpvae.module import DPVAE
    from dpvae.network import Network

    ckpt = osmfish_run["run"] / "model.ckpt"
    lit = DPVAE.load_from_checkpoint(ckpt).eval()
    net = dpvae.load(ckpt).module
    assert type(net) is Network and not isinstance(net, DPVAE)
    assert net.checkpoint_path == lit.checkpoint_path
    assert dict(net.hparams) == dict(lit.hparams)
    theirs, ours = lit.state_dict(), net.state_dict()
    assert list(theirs) == list(ours)
    for key in theirs:
        assert torch.equal(theirs[key], ours[key]), key
    query = ad.read_h5ad(osmfish_run["query"])
    np.testing.assert_array_equal(net.embed(query), lit.embed(query))
    assert net.scale_value() == lit.scale_value() and net.genes == lit.genes
    torch.save({"state_dict": {}}, osmfish_run["tmp"] / "foreign.ckpt")
    with pytest.raises(DataError, match="foreign.ckpt: not a dpvae model checkpoint"):
        Network.from_checkpoint(osmfish_run["tmp"] / "foreign.ckpt")


def test_the_prediction_command_does_not_import_lightning(osmfish_run: dict[str, Path]) -> None:
    """Prediction needs torch, not Lightning nor torchmetrics (2.7 s of its start-up): the
    command places cells and scores them without either in the process."""
    out = osmfish_run["tmp"] / "no_lightning.h5ad"
    code = (
        "import sys\n"
        "from dpvae.cli import predict_main\n"
        f"rc = predict_main(['checkpoint={osmfish_run['run'] / 'model.ckpt'}', "
        f"'query={osmfish_run['query']}', 'output={out}'])\n"
        "print('rc', rc, 'loaded', sorted(m for m in ('lightning', 'torchmetrics') if m in "
        "sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rc 0 loaded []" in done.stdout, done.stdout[-2000:]
    assert "scores against the query's true coordinates" in done.stdout
    assert ad.read_h5ad(out).obsm["spatial_dpvae"].shape == (
        ad.read_h5ad(osmfish_run["query"]).n_obs,
        2,
    )


def test_embed_matches_genes_by_name(osmfish_run: dict[str, Path]) -> None:
    """A query whose genes come in another order (and with extra genes) embeds the same."""
    model = dpvae.load(osmfish_run["run"])
    query = ad.read_h5ad(osmfish_run["query"])
    latent = model.embed(query)
    shuffled = query[:, query.var_names[::-1]].copy()
    extra = ad.AnnData(np.ones((query.n_obs, 1), dtype=np.float32), obs=query.obs[[]].copy())
    extra.var_names = ["NotAGene"]
    wider = ad.concat([shuffled, extra], axis=1)
    empty = np.asarray(query.X.sum(axis=1)).ravel() == 0  # no expression: NaN codes
    assert latent.shape == (query.n_obs, model.latent_dim)
    assert np.array_equal(np.isfinite(latent).all(axis=1), ~empty)
    np.testing.assert_allclose(model.embed(wider), latent, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.module.embed(wider), latent, rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="pass an AnnData"):
        model.module.embed(np.ones((3, 5), dtype=np.float32))


def test_python_fit_embed_predict_save(osmfish: ad.AnnData, tmp_path: Path) -> None:
    """The README's Python workflow: fit from an AnnData with command-line overrides."""
    perm = np.random.default_rng(1).permutation(osmfish.n_obs)
    ref = osmfish[np.sort(perm[:2000])].copy()
    query = osmfish[np.sort(perm[2000:2500])].copy()
    ref.obsm["xy"] = ref.obsm.pop("spatial")
    model = dpvae.fit(
        ref, "trainer.max_epochs=6", "model.warmup_epochs=2", "model.latent_dim=8", spatial_key="xy"
    )
    assert model.latent_dim == 8 and model.reference is not None and len(model.reference) > 1900
    assert model.config is not None and model.config["trainer"]["max_epochs"] == 6
    xy = model.predict(query)
    empty = np.asarray(query.X.sum(axis=1)).ravel() == 0
    assert xy.shape == (query.n_obs, 2) and np.array_equal(np.isfinite(xy).all(axis=1), ~empty)
    out = model.annotate(query.copy())
    assert set(out.obsm) >= {"spatial_dpvae", "X_dpvae"} and "scores" in out.uns["dpvae"]
    assert out.uns["dpvae"]["scores"]["dist_pearson"] > 0.2
    assert not list(tmp_path.iterdir())  # fit wrote nothing
    folder = model.save(tmp_path / "saved")
    assert {p.name for p in folder.iterdir()} == {"model.ckpt", "embedding.h5ad", "config.yaml"}
    np.testing.assert_array_equal(dpvae.load(folder).predict(query), xy)
    # a query given as a file, as fit takes its reference
    path = tmp_path / "query.h5ad"
    query.write_h5ad(path)
    np.testing.assert_array_equal(model.predict(path), xy)
    np.testing.assert_array_equal(model.embed(str(path)), model.embed(query))
    assert "spatial_dpvae" in model.annotate(path).obsm
    assert "spatial_dpvae" not in ad.read_h5ad(path).obsm  # the file is left as it is
    with pytest.raises(DataError, match="missing.h5ad"):
        model.predict(tmp_path / "missing.h5ad")


def test_predict_help_lists_every_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert predict_main(["--help"]) == 0
    text = capsys.readouterr().out
    for key in (
        "checkpoint=???",
        "query=???",
        "output=???",
        "mode=impute",
        "k=8",
        "overwrite=false",
    ):
        assert key in text
    with pytest.raises(ConfigError, match="k must be an integer"):
        from dpvae.config import load_config

        load_config(["checkpoint=a", "query=b", "output=c", "k=1.5"], root_file="predict.yaml")


def test_fit_predict_is_fit_then_predict(osmfish_small: Path) -> None:
    """The benchmark's one call: the same placements as the API's fit and predict; transfer
    differs only by centring the query (align_query)."""
    from dpvae.api import fit_predict
    from dpvae.metrics import median_nn_distance, score_coordinates

    src = ad.read_h5ad(osmfish_small)
    ref, query = src[:900].copy(), src[900:].copy()
    truth = query.obsm.pop("spatial")
    overrides = ("trainer.max_epochs=4", "model.warmup_epochs=1")
    impute = fit_predict(ref, query, "impute", seed=0, overrides=overrides)
    model = dpvae.fit(ref, "seed=0", *overrides)
    np.testing.assert_array_equal(impute, model.predict(query))
    np.testing.assert_array_equal(
        fit_predict(ref, query, "transfer", seed=0, overrides=overrides),
        model.predict(query, align_query=True),
    )
    spacing = median_nn_distance(ref.obsm["spatial"])
    placed = np.isfinite(impute).all(axis=1)  # cells without expression are NaN
    assert placed.mean() > 0.9
    scores = score_coordinates(impute[placed], truth[placed], "impute", spacing)
    assert scores["dist_pearson"] > 0.2
    with pytest.raises(ValueError, match="task must be"):
        fit_predict(ref, query, "anchored")


def test_chunked_encoding_and_placement_equal_one_block(osmfish_run: dict[str, Path]) -> None:
    """The query read, embedded and placed in small blocks gives the placements of one block."""
    model = dpvae.load(osmfish_run["run"])
    query = ad.read_h5ad(osmfish_run["query"])
    whole = placement.encode(model.module, query, block=10**9)
    parts = placement.encode(model.module, query, batch_size=64, block=128)
    np.testing.assert_array_equal(parts[0], whole[0])
    ref = model.reference
    assert ref is not None
    pre = model.module.preprocessor
    latent, pcs = whole[0], whole[1]
    keep = ~np.isnan(latent).any(axis=1)
    args = (latent[keep], ref.search_latent(), pre.coords_to_model(ref.coords))
    kwargs = dict(query_pcs=None if pcs is None else pcs[keep], ref_pcs=ref.pcs)
    one = placement.place(*args, **kwargs, block=10**9)
    for align in (False, True):
        np.testing.assert_array_equal(
            placement.place(*args, **kwargs, align_query=align, block=97).numpy(),
            placement.place(*args, **kwargs, align_query=align, block=10**9).numpy(),
        )
    np.testing.assert_array_equal(placement.place(*args, **kwargs, block=97).numpy(), one.numpy())


def _two_sections(run: Path, tmp: Path) -> Path:
    """The run's embedding split into two sections; section B's frame shifted far away."""
    emb = placement.ReferenceEmbedding.read(run / "embedding.h5ad")
    n = len(emb)
    section = np.where(np.arange(n) % 2 == 0, "A", "B")
    coords = emb.coords.copy()
    coords[section == "B"] += 100.0 * float(np.ptp(coords))
    emb.coords, emb.section, emb.sections = coords, section, ("A", "B")
    folder = tmp / "two"
    dpvae.load(run).save(folder)
    emb.write(folder / "embedding.h5ad")
    return folder


def test_reference_section_filters_the_reference(
    osmfish_run: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _two_sections(osmfish_run["run"], osmfish_run["tmp"])
    file = ad.read_h5ad(folder / "embedding.h5ad")
    assert list(file.obs["section"].cat.categories) == ["A", "B"]
    assert list(file.uns["dpvae"]["sections"]) == ["A", "B"]
    model = dpvae.load(folder)
    assert model.reference is not None and model.reference.sections == ("A", "B")
    query = ad.read_h5ad(osmfish_run["query"])
    first = model.predict(query)  # the first section by default
    a = model.predict(query, reference_section="A")
    b = model.predict(query, reference_section="B")
    np.testing.assert_array_equal(first, a)
    placed = np.isfinite(a).all(axis=1)
    assert placed.any()
    # each section's cells alone: B's placements are in B's shifted frame
    assert np.nanmin(b[:, 0]) > 50.0 * float(np.ptp(a[placed]))
    ref = model.reference
    half, name = ref.select_section("B")
    assert name == "B" and len(half) == int((ref.section == "B").sum())
    # calibrated over all cells before the filter, and not again; the split kept, so that only
    # the section's held-out cells calibrate its radius
    assert half.calibrated and ref.in_sample is not None and half.in_sample is not None
    np.testing.assert_array_equal(half.in_sample, ref.in_sample[ref.section == "B"])
    np.testing.assert_array_equal(half.latent, ref.search_latent()[ref.section == "B"])
    np.testing.assert_array_equal(half.search_latent(), half.latent)
    with pytest.raises(ConfigError, match="its sections: A, B"):
        model.predict(query, reference_section="C")
    out = osmfish_run["tmp"] / "sec.h5ad"
    args = [f"checkpoint={folder / 'model.ckpt'}", f"query={osmfish_run['query']}"]
    assert predict_main([*args, f"output={out}", "reference_section=B"]) == 0
    assert "reference section B of 2" in capsys.readouterr().out
    assert ad.read_h5ad(out).uns["dpvae"]["reference_section"] == "B"
    code = predict_main([*args, f"output={osmfish_run['tmp'] / 'x.h5ad'}", "reference_section=C"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "its sections: A, B" in err[0]
    # a one-section reference: as before, no section in the output
    one = [f"checkpoint={osmfish_run['run'] / 'model.ckpt'}", f"query={osmfish_run['query']}"]
    plain = predict_main([*one, f"output={osmfish_run['tmp'] / 'one.h5ad'}"])
    assert plain == 0 and "reference section" not in capsys.readouterr().out
    assert "reference_section" not in ad.read_h5ad(osmfish_run["tmp"] / "one.h5ad").uns["dpvae"]
    with pytest.raises(ConfigError, match="no named sections"):
        dpvae.load(osmfish_run["run"]).predict(query, reference_section="A")


def test_a_large_query_is_streamed_from_disk(
    osmfish_run: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above the size limit the query is read backed and the output written by copying the file:
    the same content as the in-memory path."""
    from dpvae import cli

    args = [f"checkpoint={osmfish_run['run'] / 'model.ckpt'}", f"query={osmfish_run['query']}"]
    assert predict_main([*args, f"output={tmp_path / 'memory.h5ad'}"]) == 0
    monkeypatch.setattr(cli, "STREAM_QUERY_MB", 0.0)
    assert predict_main([*args, f"output={tmp_path / 'stream.h5ad'}", "plot=ClusterName"]) == 0
    memory, stream = ad.read_h5ad(tmp_path / "memory.h5ad"), ad.read_h5ad(tmp_path / "stream.h5ad")
    for key in ("spatial_dpvae", "X_dpvae", "spatial"):
        np.testing.assert_array_equal(stream.obsm[key], memory.obsm[key])
    import scipy.sparse as sp

    def dense(x: object) -> np.ndarray:
        return x.toarray() if sp.issparse(x) else np.asarray(x)

    np.testing.assert_array_equal(dense(stream.X), dense(memory.X))
    assert list(stream.obs_names) == list(memory.obs_names)
    assert stream.uns["dpvae"]["scores"] == memory.uns["dpvae"]["scores"]
    assert (tmp_path / "stream.png").stat().st_size > 10_000


def test_embed_reference_keeps_the_sections(osmfish_run: dict[str, Path], tmp_path: Path) -> None:
    """A datamodule's cells of several sections: embedding.h5ad records each cell's section
    (categorical, in the reference's order) and the names, and reads them back."""
    from dpvae.contracts import Cells
    from dpvae.io import align_genes, get_coordinates

    model = dpvae.load(osmfish_run["run"])
    query = ad.read_h5ad(osmfish_run["query"])
    raw, _ = align_genes(query, model.genes)
    n = query.n_obs
    section = np.where(np.arange(n) < n // 3, "second", "first")
    cells = Cells(
        raw=raw,
        coords=get_coordinates(query),
        index=np.arange(n),
        names=np.asarray(query.obs_names).astype(str),
        section=section,
        sections=("first", "second"),
    )

    class Data:
        preprocessor = model.module.preprocessor

        def cells(self, split: str) -> Cells:
            return (
                cells
                if split == "all"
                else Cells(raw[:10], cells.coords[:10], np.arange(10), cells.names[:10])
            )

    emb = placement.embed_reference(model.module, Data())  # type: ignore[arg-type]
    path = emb.write(tmp_path / "embedding.h5ad")
    file = ad.read_h5ad(path)
    assert list(file.obs["section"].cat.categories) == ["first", "second"]
    assert list(file.uns["dpvae"]["sections"]) == ["first", "second"]
    back = placement.ReferenceEmbedding.read(path)
    assert back.sections == ("first", "second")
    np.testing.assert_array_equal(back.section, section)
    assert len(back.select_section()[0]) == int((section == "first").sum())


def test_coordinates_of_another_dimension_are_refused_or_left_unscored(
    osmfish_run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A reference of 3-D cells for a 2-D model: one line, exit 2, nothing written. A query
    carrying 3-D true positions: placed (2-D) and not scored against them, with a warning."""
    query = ad.read_h5ad(osmfish_run["query"])
    deep = query.copy()
    deep.obsm["spatial"] = np.c_[deep.obsm["spatial"], np.zeros(deep.n_obs)]
    deep.write_h5ad(tmp_path / "deep.h5ad")
    args = [f"checkpoint={osmfish_run['run'] / 'model.ckpt'}"]
    out = tmp_path / "o.h5ad"
    code = predict_main(
        [
            *args,
            f"query={osmfish_run['query']}",
            f"reference={tmp_path / 'deep.h5ad'}",
            f"output={out}",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "has 3 columns but the model" in err[0], err
    assert not out.exists()
    with pytest.warns(DPVAEWarning, match="has 3 columns, the placements 2: no scores"):
        info = dpvae.load(osmfish_run["run"])._predict(deep).info
    assert "scores" not in info


def test_training_with_two_validation_cells_scores_none_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Distance scores need 3 cells: 2 validation cells train (their loss is still validated)
    with a warning instead of a traceback at the first spatial validation."""
    rng = np.random.default_rng(0)
    a = ad.AnnData(X=sp.csr_matrix(rng.poisson(3.0, size=(20, 30)).astype(np.float32) + 1))
    a.var_names = [f"g{j}" for j in range(30)]
    a.obsm["spatial"] = rng.uniform(0, 10, size=(20, 2))
    a.write_h5ad(tmp_path / "s20.h5ad")
    with pytest.warns(DPVAEWarning, match="the reference has 2; the spatial scores"):
        code = train_main(
            [
                f"data.reference={tmp_path / 's20.h5ad'}",
                f"run_dir={tmp_path / 'run'}",
                "logger=none",
                "trainer.max_epochs=5",
                "model.warmup_epochs=1",
            ]
        )
    assert code == 0 and "no spatial validation scores" in capsys.readouterr().err
    assert (tmp_path / "run" / "model.ckpt").exists()
    # 2 held-out cells calibrate no radius: a figure asked to shade by it is drawn unshaded
    out = tmp_path / "placed.h5ad"
    args = [f"checkpoint={tmp_path / 'run'}", f"query={tmp_path / 's20.h5ad'}", f"output={out}"]
    assert predict_main([*args, "plot=dpvae_radius90"]) == 0
    err = capsys.readouterr().err
    assert "no dpvae_radius90" in err and "the figure shows the layouts unshaded" in err
    assert "dpvae_radius90" not in ad.read_h5ad(out).obs
    assert out.with_suffix(".png").stat().st_size > 10_000
