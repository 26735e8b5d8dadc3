"""Per-cell uncertainty: a radius that holds the true position with 90% probability."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import dpvae
from dpvae.cli import predict_main
from dpvae.errors import DPVAEWarning
from dpvae.placement import (
    RADIUS_KEY,
    ReferenceEmbedding,
    conformal_radius,
    place,
    with_run_record,
)
from dpvae.preprocess import Preprocessor


def _tissue(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Cells on a square whose codes are their positions plus noise that grows to the right."""
    xy = rng.uniform(0, 10, size=(n, 2))
    noise = (0.05 + 0.3 * xy[:, :1] / 10) * rng.normal(size=(n, 6))
    latent = np.c_[xy, np.zeros((n, 4))] + noise
    return xy, latent.astype(np.float32)


def _stub_model() -> SimpleNamespace:
    pre = Preprocessor(
        genes=["g"], count_data=True, normalize=True, log1p=True, coord_center=[0.0, 0.0]
    )
    pre.ref_nn_distance = 0.2
    return SimpleNamespace(preprocessor=pre, scale_value=lambda: 1.0)


def test_the_radius_covers_90_percent_of_exchangeable_cells_and_follows_difficulty() -> None:
    rng = np.random.default_rng(0)
    xy, latent = _tissue(3000, rng)
    ref = ReferenceEmbedding(latent=latent, coords=xy)
    model = _stub_model()
    record = conformal_radius(model, ref, k=8, expression_weight=0.0)
    assert record is not None and record["n_calibration"] == 3000
    qxy, qlatent = _tissue(3000, rng)
    spread = torch.empty(len(qxy), dtype=torch.float64)
    pred = place(qlatent, latent, xy, k=8, spread=spread).numpy()
    radius = record["quantile"] * (spread.numpy() + record["floor"])
    error = np.linalg.norm(pred - qxy, axis=1)
    assert 0.87 <= np.mean(error <= radius) <= 0.93
    # informative: noisier (right-hand) cells get larger radii, so radius tracks the error
    assert spearmanr(radius, error)[0] > 0.3
    assert np.median(radius[qxy[:, 0] > 7]) > 1.5 * np.median(radius[qxy[:, 0] < 3])
    # held-out cells of a run calibrate instead of folds when there are some
    in_sample = np.ones(3000, dtype=bool)
    in_sample[:300] = False
    run = ReferenceEmbedding(latent=latent, coords=xy, in_sample=in_sample)
    held = conformal_radius(model, run, k=8, expression_weight=0.0)
    assert held is not None and held["n_calibration"] == 300 and "held-out" in held["calibration"]
    assert conformal_radius(model, ReferenceEmbedding(latent=latent[:3], coords=xy[:3])) is None


def test_prediction_writes_a_calibrated_radius(
    osmfish_run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "placed.h5ad"
    code = predict_main(
        [
            f"checkpoint={osmfish_run['run'] / 'model.ckpt'}",
            f"query={osmfish_run['query']}",
            f"output={out}",
            f"plot={RADIUS_KEY}",
        ]
    )
    assert code == 0
    said = capsys.readouterr().out
    assert "90% radius: median" in said and "coverage90" in said
    placed = ad.read_h5ad(out)
    radius = placed.obs[RADIUS_KEY].to_numpy()
    record = placed.uns["dpvae"]["radius"]
    assert record["coverage"] == 0.9 and "held-out" in record["calibration"]
    error = np.linalg.norm(placed.obsm["spatial_dpvae"] - placed.obsm["spatial"], axis=1)
    ok = np.isfinite(radius)
    # held-out cells of the same tissue: close to the promised 90%, and informative
    assert 0.82 <= np.mean(error[ok] <= radius[ok]) <= 0.97
    assert spearmanr(radius[ok], error[ok])[0] > 0.2
    assert out.with_suffix(".png").stat().st_size > 10_000
    # the same from Python
    xy, r = dpvae.load(osmfish_run["run"]).predict_with_radius(ad.read_h5ad(osmfish_run["query"]))
    np.testing.assert_allclose(r[ok], radius[ok], rtol=1e-6)
    np.testing.assert_allclose(xy, placed.obsm["spatial_dpvae"], rtol=1e-6)


def test_held_out_calibration_meets_the_query_s_mix_of_codes() -> None:
    """A query is placed against training and held-out cells together; held-out codes are as
    noisy as the query's (out of sample), training codes tighter. Calibrating held-out cells
    against the training cells alone saw smaller neighbour spreads than the query meets and
    over-covered (0.97 here, as on DLPFC); against every other reference cell, fold by fold, it
    covers 90%."""
    rng = np.random.default_rng(1)
    n, n_held = 4000, 600

    def codes(xy: np.ndarray, noise: float) -> np.ndarray:
        return (np.c_[xy, np.zeros((len(xy), 4))] + noise * rng.normal(size=(len(xy), 6))).astype(
            np.float32
        )

    xy = rng.uniform(0, 10, size=(n, 2))
    in_sample = np.ones(n, dtype=bool)
    in_sample[rng.choice(n, n_held, replace=False)] = False
    latent = np.where(in_sample[:, None], codes(xy, 0.05), codes(xy, 1.0))
    run = ReferenceEmbedding(latent=latent, coords=xy, in_sample=in_sample)
    record = conformal_radius(_stub_model(), run, k=8, expression_weight=0.0)
    assert record is not None and record["n_calibration"] == n_held
    assert "10 folds" in record["calibration"]
    qxy = rng.uniform(0, 10, size=(3000, 2))
    spread = torch.empty(len(qxy), dtype=torch.float64)
    pred = place(codes(qxy, 1.0), run.search_latent(), xy, k=8, spread=spread).numpy()
    radius = record["quantile"] * (spread.numpy() + record["floor"])
    coverage = np.mean(np.linalg.norm(pred - qxy, axis=1) <= radius)
    assert 0.86 <= coverage <= 0.94, coverage


def test_an_expression_reference_of_the_run_s_own_cells_keeps_its_split_and_calibration() -> None:
    rng = np.random.default_rng(0)
    xy, latent = _tissue(40, rng)
    names = np.array([f"c{i}" for i in range(40)])
    record = {"quantile": 2.0, "floor": 0.01, "calibration": "cross-validation"}
    run = ReferenceEmbedding(
        latent, xy, in_sample=np.arange(40) < 30, names=names, calibration=record
    )
    fresh = ReferenceEmbedding(latent[::-1].copy(), xy[::-1].copy(), names=names[::-1].copy())
    kept = with_run_record(fresh, run)
    np.testing.assert_array_equal(kept.in_sample, (np.arange(40) < 30)[::-1])
    assert kept.calibration == record
    # a subset: the split, not the calibration made on all of them
    part = with_run_record(ReferenceEmbedding(latent[:20], xy[:20], names=names[:20]), run)
    assert part.in_sample is not None and part.in_sample.all() and part.calibration is None
    # the same names (Visium barcodes repeat across sections) at other positions, or with
    # other codes: new cells
    moved = ReferenceEmbedding(latent, xy + 1.0, names=names)
    assert with_run_record(moved, run) is moved
    other = ReferenceEmbedding(latent + 0.5, xy, names=names)
    assert with_run_record(other, run) is other


def test_the_embedding_file_keeps_the_run_s_calibration(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    xy, latent = _tissue(30, rng)
    record = {"coverage": 0.9, "quantile": 1.5, "floor": 0.02, "n_calibration": 30}
    emb = ReferenceEmbedding(
        latent,
        xy,
        in_sample=np.ones(30, dtype=bool),
        names=np.array([f"c{i}" for i in range(30)]),
        calibration=record,
    )
    back = ReferenceEmbedding.read(emb.write(tmp_path / "embedding.h5ad"))
    assert back.calibration == record
    model = _stub_model()
    # prediction uses it rather than calibrating on the (training) cells again, which give none
    assert conformal_radius(model, back) == record
    with pytest.warns(DPVAEWarning, match="0 cells the model did not train on"):
        assert conformal_radius(model, replace(back, calibration=None)) is None


def test_the_conformal_quantile_is_the_finite_sample_rank_and_covers_ninety_percent() -> None:
    """The radius's quantile is the ceil((n + 1) * 0.9)-th smallest calibration score (19th of
    20, 24th of 25; the largest below 9), not the one above it: over many draws of exchangeable
    scores, a new score falls within it 0.905 of the time with 20 (0.952 with the largest)."""
    from dpvae.placement import conformal_rank, radius_record

    assert [conformal_rank(n) for n in (4, 8, 9, 10, 20, 25, 99, 500)] == [
        4, 8, 9, 10, 19, 24, 90, 451,
    ]  # fmt: skip
    rng = np.random.default_rng(0)
    for n, rank in ((20, 19), (25, 24), (8, 8)):
        scores = rng.permutation(np.arange(1.0, n + 1))
        assert radius_record(scores, 0.0, "test")["quantile"] == rank
    draws = rng.exponential(size=(20000, 21))
    quantile = np.array([radius_record(d[:20], 0.0, "t")["quantile"] for d in draws])
    covered = float(np.mean(draws[:, 20] <= quantile))
    assert covered == pytest.approx(19 / 21, abs=0.006)


def test_the_record_says_what_coverage_its_calibration_cells_guarantee() -> None:
    """Fewer than 9 calibration scores: the quantile is the largest, which a new exchangeable
    score stays under with probability n / (n + 1), not 0.9; the record says so, and so does
    prediction (a warning)."""
    from dpvae.placement import radius_record

    assert radius_record(np.arange(1.0, 21.0), 0.0, "t")["level"] == pytest.approx(19 / 21)
    assert radius_record(np.arange(1.0, 6.0), 0.0, "t")["level"] == pytest.approx(5 / 6)
    rng = np.random.default_rng(3)
    draws = rng.exponential(size=(20000, 6))
    quantile = np.array([radius_record(d[:5], 0.0, "t")["quantile"] for d in draws])
    assert float(np.mean(draws[:, 5] <= quantile)) == pytest.approx(5 / 6, abs=0.01)


def test_a_run_s_training_cells_never_calibrate_the_radius() -> None:
    """A training cell's placement error is the model's own fit: a radius calibrated on training
    cells is far too small for a new cell. With too few held-out cells there is no radius (a
    warning says why), and a section of a several-section reference calibrates on its own
    held-out cells, not on all of its cells."""
    rng = np.random.default_rng(2)
    model = _stub_model()
    xy = rng.uniform(0, 10, size=(600, 2))
    # training cells' codes sit on their positions (fit), held-out cells' are noisy (new)
    fit = np.c_[xy, np.zeros((600, 4))].astype(np.float32)
    new = (fit + rng.normal(scale=0.8, size=fit.shape)).astype(np.float32)
    in_sample = np.ones(600, dtype=bool)
    with pytest.warns(DPVAEWarning, match="held-out cells"):
        assert conformal_radius(model, ReferenceEmbedding(fit, xy, in_sample=in_sample)) is None
    in_sample[:3] = False  # three held out: too few
    with pytest.warns(DPVAEWarning, match="3 cells the model did not train on"):
        assert conformal_radius(model, ReferenceEmbedding(fit, xy, in_sample=in_sample)) is None
    # two sections, 40 held-out cells each: the chosen section calibrates on its own 40
    in_sample = np.ones(600, dtype=bool)
    in_sample[rng.choice(300, 40, replace=False)] = False
    in_sample[300 + rng.choice(300, 40, replace=False)] = False
    latent = np.where(in_sample[:, None], fit, new)
    section = np.repeat(["a", "b"], 300)
    both = ReferenceEmbedding(latent, xy, in_sample=in_sample, section=section, sections=("a", "b"))
    b, name = both.select_section("b")
    assert name == "b" and b.in_sample is not None and int((~b.in_sample).sum()) == 40
    # the search codes are the calibrated ones of the whole reference, not calibrated again
    np.testing.assert_array_equal(b.search_latent(), both.search_latent()[300:])
    record = conformal_radius(model, b, k=8, expression_weight=0.0)
    assert record is not None and record["n_calibration"] == 40
    assert "held-out" in record["calibration"]
    # calibrated on every cell of the section instead (as before): training cells' small errors
    everyone = replace(b, in_sample=None)
    assert (
        conformal_radius(model, everyone, k=8, expression_weight=0.0)["quantile"]
        < 0.5 * (record["quantile"])
    )


def test_a_stored_calibration_holds_only_for_the_rule_it_was_made_with() -> None:
    """Fine-tuning calibrates its radius at prediction's default k and expression weight; the
    neighbour spread that scales it depends on both, so another k gets no radius, not a wrong
    one."""
    from dpvae.placement import EXPRESSION_WEIGHT, NEIGHBOURS, radius_record

    rng = np.random.default_rng(0)
    xy, latent = _tissue(200, rng)
    stored = radius_record(np.arange(1.0, 14.0), 0.01, "cross-validation")
    ref = ReferenceEmbedding(latent, xy, in_sample=np.ones(200, bool), calibration=stored)
    model = _stub_model()
    same = conformal_radius(model, ref, k=NEIGHBOURS, expression_weight=EXPRESSION_WEIGHT)
    assert same == stored
    with pytest.warns(DPVAEWarning, match="calibrated for k=8"):
        assert conformal_radius(model, ref, k=1, expression_weight=EXPRESSION_WEIGHT) is None


def test_a_reference_in_other_units_tells_radii_in_its_own_cell_spacings(
    osmfish_run: dict[str, Path],
) -> None:
    """Cells given as the reference set the cell spacing the radius is told in (and its floor):
    the same cells in units 100 times larger give radii 100 times larger, the same number of
    cell spacings."""
    model = dpvae.load(osmfish_run["run"])
    query = ad.read_h5ad(osmfish_run["query"])
    emb = model.reference
    assert emb is not None
    cells = ReferenceEmbedding(emb.search_latent(), emb.coords, emb.pcs)  # new to the model
    spacings, medians = [], []
    for factor in (1.0, 100.0):
        ref = replace(cells, coords=cells.coords * factor)
        pred = model._predict(query, ref, mode="impute")
        spacings.append(pred.info["radius"]["median_cell_spacings"])
        medians.append(pred.info["radius"]["median"])
    assert medians[1] == pytest.approx(100 * medians[0], rel=1e-6)
    assert spacings[1] == pytest.approx(spacings[0], rel=1e-6)
