"""Fine-tuning a trained model on a few cells of known position (``init_from``)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

import dpvae
from dpvae.cli import predict_main, train_main
from dpvae.errors import DPVAEWarning
from dpvae.module import DPVAE


def _anchors(query: Path, tmp: Path, n: int = 13, shift: float = 0.0) -> tuple[Path, Path]:
    """``n`` cells of the query as anchors (in a frame shifted by ``shift``), the rest as query."""
    q = ad.read_h5ad(query)
    perm = np.random.default_rng(0).permutation(q.n_obs)
    anchors = q[np.sort(perm[:n])].copy()
    anchors.obsm["spatial"] = anchors.obsm["spatial"] + shift
    rest = q[np.sort(perm[n:])].copy()
    rest.obsm["spatial"] = rest.obsm["spatial"] + shift
    paths = tmp / "anchors.h5ad", tmp / "rest.h5ad"
    anchors.write_h5ad(paths[0])
    rest.write_h5ad(paths[1])
    return paths


def _train(args: list[str]) -> int:
    return train_main([*args, "logger=none", "trainer.enable_progress_bar=false"])


def test_fine_tuning_on_13_anchors_then_placing_the_rest(
    osmfish_run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    anchors, rest = _anchors(osmfish_run["query"], tmp_path, shift=1e4)
    base = osmfish_run["run"] / "model.ckpt"
    run = tmp_path / "tuned"
    code = _train(
        [
            f"init_from={base}",
            f"data.reference={anchors}",
            f"run_dir={run}",
            "callbacks.freeze.modules=[encoder.body.0]",
            "finetune.route=anchors",  # placed against the fine-tuned model's anchors
        ]
    )
    assert code == 0
    err = capsys.readouterr().err
    assert "fine-tuning data: 13 cells on the model's" in err
    # the schedule: the epoch of 0, 5, ..., 40 that placed the held-out folds best
    chosen = re.search(r"cross-validation \(5 folds\): .* -> (\d+) epochs", err)
    assert chosen, err
    errors = dict(re.findall(r"(\d+): ([\d.]+)", err.split("by epoch")[1].split("->")[0]))
    assert list(map(int, errors)) == list(range(0, 45, 5))
    assert min(errors.values(), key=float) == errors[chosen.group(1)]
    # a "done" line either way (0: the starting model kept)
    assert re.search(rf"done: {chosen.group(1)} epochs", err)
    before = DPVAE.load_from_checkpoint(base)
    after = DPVAE.load_from_checkpoint(run / "model.ckpt")
    assert after.genes == before.genes
    # the frozen first layer kept its weights and batch-norm statistics; the rest moved
    for name in ("encoder.body.0.weight", "encoder.body.0.bias"):
        assert torch.equal(before.state_dict()[name], after.state_dict()[name]), name
    assert not torch.equal(
        before.state_dict()["encoder.mu.weight"], after.state_dict()["encoder.mu.weight"]
    )
    # the anchors' own frame: centred on them
    anchor_xy = ad.read_h5ad(anchors).obsm["spatial"]
    np.testing.assert_allclose(after.preprocessor.coord_center, anchor_xy.mean(axis=0))
    out = tmp_path / "placed.h5ad"
    code = predict_main(
        [
            f"checkpoint={run / 'model.ckpt'}",
            f"query={rest}",
            f"reference={anchors}",
            f"output={out}",
        ]
    )
    assert code == 0
    placed = ad.read_h5ad(out)
    # the radius of the fine-tuning's cross-validation, kept for the run's own anchors
    assert "cross-validation over the 13" in placed.uns["dpvae"]["radius"]["calibration"]
    xy = placed.obsm["spatial_dpvae"]
    truth = placed.obsm["spatial"]
    # placed in the anchors' (shifted) frame, near the truth on average
    assert np.linalg.norm(np.nanmean(xy, axis=0) - truth.mean(axis=0)) < 0.2 * np.ptp(truth[:, 0])


def test_fine_tuning_from_python(osmfish_run: dict[str, Path], tmp_path: Path) -> None:
    anchors, rest = _anchors(osmfish_run["query"], tmp_path, n=40)
    model = dpvae.load(osmfish_run["run"])
    tuned = model.fine_tune(ad.read_h5ad(anchors), "trainer.max_epochs=5")
    assert len(tuned.reference) == 40 and tuned.genes == model.genes
    xy = tuned.predict(ad.read_h5ad(rest))
    # every cell placed (cells without expression get NaN, by the rule of prediction)
    assert xy.shape == (ad.read_h5ad(rest).n_obs, 2) and np.isfinite(xy).all(axis=1).mean() > 0.95
    # the original model is left as it was
    assert torch.equal(
        model.module.state_dict()["encoder.mu.weight"],
        dpvae.load(osmfish_run["run"]).module.state_dict()["encoder.mu.weight"],
    )


@pytest.mark.parametrize(
    "case", ["foreign_checkpoint", "no_coordinates", "no_shared_gene", "freeze"]
)
def test_bad_fine_tuning_input_is_one_line(
    case: str,
    osmfish_run: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    anchors, _ = _anchors(osmfish_run["query"], tmp_path)
    base = osmfish_run["run"] / "model.ckpt"
    args = [f"init_from={base}", f"data.reference={anchors}"]
    if case == "foreign_checkpoint":
        other = tmp_path / "other.ckpt"
        torch.save({"state_dict": {"w": torch.zeros(2)}}, other)
        args[0], message = f"init_from={other}", "not a dpvae model checkpoint"
    elif case == "no_coordinates":
        a = ad.read_h5ad(anchors)
        del a.obsm["spatial"]
        a.write_h5ad(anchors)
        message = r"no coordinates under obsm\['spatial'\]"
    elif case == "no_shared_gene":
        a = ad.read_h5ad(anchors)
        a.var_names = [f"other{i}" for i in range(a.n_vars)]
        a.write_h5ad(anchors)
        message = "shares no gene with the model's"
    else:
        args.append("callbacks.freeze.modules=[encoder.first]")
        message = "callbacks.freeze.modules names 'encoder.first'"
    run = tmp_path / "run"
    code = _train([*args, f"run_dir={run}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("dpvae: error: "), err
    assert re.search(message, err[0]), err[0]
    assert not (run / "config.yaml").exists() and not (run / "model.ckpt").exists()


def test_cross_validation_calibrates_the_radius_on_cells_no_fit_saw(
    osmfish_run: dict[str, Path], tmp_path: Path
) -> None:
    anchors, rest = _anchors(osmfish_run["query"], tmp_path, n=60)
    model = dpvae.load(osmfish_run["run"])
    a, q = ad.read_h5ad(anchors), ad.read_h5ad(rest)
    truth = q.obsm["spatial"]
    error = {}
    for folds in (5, 0):
        # a learning rate that over-fits 60 anchors in 40 epochs
        tuned = model.fine_tune(
            a, f"finetune.folds={folds}", "model.lr=0.003", "finetune.route=anchors"
        )
        record = tuned.reference.calibration
        assert (record is not None) == (folds > 0)
        if folds:
            xy, r = tuned.predict_with_radius(q)
            ok = np.isfinite(r)
            e = np.linalg.norm(xy - truth, axis=1)
            # calibrated on anchors no fold fit saw: the promised 90%
            covered = float(np.mean(e[ok] <= r[ok]))
            assert ok.sum() > 0.9 * len(r) and 0.85 <= covered <= 0.98, covered
            # the same anchors calibrated as training cells give a radius that misses more
            trained = replace(tuned.reference, calibration=None, in_sample=None)
            _, small = tuned.predict_with_radius(q, reference=trained)
            assert float(np.mean(e[ok] <= small[ok])) < covered - 0.05
        else:
            # every anchor is a training cell and nothing held out: no radius, and why
            with pytest.warns(DPVAEWarning, match="did not train on"):
                xy, r = tuned.predict_with_radius(q)
            assert np.isnan(r).all()
            e = np.linalg.norm(xy - truth, axis=1)
        error[folds] = float(np.nanmedian(e))
    # and the schedule it chose placed the query no worse than the full one
    assert error[5] <= error[0] * 1.02, error


def test_a_fit_of_no_step_leaves_a_model_to_predict_with(
    osmfish_run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    anchors, rest = _anchors(osmfish_run["query"], tmp_path)
    base = osmfish_run["run"] / "model.ckpt"
    run = tmp_path / "kept"
    args = [f"init_from={base}", f"data.reference={anchors}", f"run_dir={run}"]
    assert _train([*args, "trainer.max_epochs=0"]) == 0
    kept = DPVAE.load_from_checkpoint(run / "model.ckpt")
    before = DPVAE.load_from_checkpoint(base)
    for name, value in before.state_dict().items():  # lambda is re-fitted when training starts
        assert name == "scale_initialised" or torch.equal(value, kept.state_dict()[name]), name
    capsys.readouterr()
    assert _train([*args, "trainer.max_epochs=0"]) == 0  # the same command: nothing to do
    assert "already holds a finished run (0 epochs)" in capsys.readouterr().err
    out = tmp_path / "placed.h5ad"
    assert predict_main([f"checkpoint={run / 'model.ckpt'}", f"query={rest}", f"output={out}"]) == 0
    assert np.isfinite(ad.read_h5ad(out).obsm["spatial_dpvae"]).all(axis=1).mean() > 0.95


def test_the_route_through_the_starting_run_s_cells(
    osmfish_run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """finetune.route=through: the folds score both routes, the starting model is kept, its
    run's cells travel in through.h5ad, and prediction places the rest of the section through
    them into the anchors' (shifted) frame, from the command (with or without reference=) and
    from Python; auto takes the route of the higher held-out dist_pearson."""
    anchors, rest = _anchors(osmfish_run["query"], tmp_path, n=20, shift=1e4)
    base = osmfish_run["run"] / "model.ckpt"
    run = tmp_path / "through"
    args = [f"init_from={base}", f"data.reference={anchors}", f"run_dir={run}"]
    assert _train([*args, "finetune.route=through"]) == 0
    err = capsys.readouterr().err
    scores = re.search(
        r"against the anchors (-?[\d.]+), through the starting model's reference", err
    )
    assert scores and "placed through its reference (the starting model kept)" in err, err
    assert (run / "through.h5ad").exists()
    kept, before = DPVAE.load_from_checkpoint(run / "model.ckpt"), DPVAE.load_from_checkpoint(base)
    assert torch.equal(
        kept.state_dict()["encoder.mu.weight"], before.state_dict()["encoder.mu.weight"]
    )
    truth = ad.read_h5ad(rest).obsm["spatial"]
    placed = {}
    for name, extra in (("given", [f"reference={anchors}"]), ("from_config", [])):
        out = tmp_path / f"{name}.h5ad"
        code = predict_main(
            [f"checkpoint={run / 'model.ckpt'}", f"query={rest}", f"output={out}", *extra]
        )
        assert code == 0, capsys.readouterr().err
        result = ad.read_h5ad(out)
        assert result.uns["dpvae"]["anchors"]["n_anchors"] == 20
        placed[name] = result.obsm["spatial_dpvae"]
    assert np.array_equal(placed["given"], placed["from_config"], equal_nan=True)
    xy = placed["given"]
    assert np.linalg.norm(np.nanmean(xy, axis=0) - truth.mean(axis=0)) < 0.2 * np.ptp(truth[:, 0])
    loaded = dpvae.load(run)
    assert loaded.through is not None
    assert np.array_equal(loaded.predict(ad.read_h5ad(rest)), xy, equal_nan=True)
    given = loaded.predict(ad.read_h5ad(rest), anchors=ad.read_h5ad(anchors))
    assert np.array_equal(given, xy, equal_nan=True)
    # the same placements and radius as the starting run's route (its cell spacing, not the
    # anchors' far sparser one)
    direct = dpvae.load(osmfish_run["run"])._predict(
        ad.read_h5ad(rest), anchors=ad.read_h5ad(anchors)
    )
    assert np.allclose(direct.coords, xy, equal_nan=True)
    via_run = loaded._predict(ad.read_h5ad(rest))
    assert via_run.info["radius"]["median_cell_spacings"] == pytest.approx(
        direct.info["radius"]["median_cell_spacings"]
    )
    # a folder saved over by a model without the route keeps no stale through.h5ad
    copy = loaded.save(tmp_path / "copy")
    assert (copy / "through.h5ad").exists()
    dpvae.load(osmfish_run["run"]).save(copy, overwrite=True)
    assert not (copy / "through.h5ad").exists() and dpvae.load(copy).through is None
    # auto: the route of the higher pooled held-out dist_pearson
    model = dpvae.load(osmfish_run["run"])
    tuned = model.fine_tune(ad.read_h5ad(anchors), "finetune.route=auto")
    cv = tuned.cross_validation
    assert cv is not None and set(cv.scores) == {"anchors", "through"}
    better = "through" if cv.scores["through"] > cv.scores["anchors"] else "anchors"
    assert cv.route == better and (tuned.through is not None) == (better == "through")
    # a bad route: one line before the imports, nothing written
    bad = tmp_path / "bad"
    assert _train([*args[:2], f"run_dir={bad}", "finetune.route=sideways"]) == 2
    assert "finetune.route must be one of auto, anchors, through" in capsys.readouterr().err
    assert not bad.exists()
