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
    # prediction uses it rather than calibrating on the (training) cells again
    assert conformal_radius(model, back) == record
    assert conformal_radius(model, replace(back, calibration=None)) != record


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
