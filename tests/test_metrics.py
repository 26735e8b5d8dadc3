"""Tests of dpvae.metrics: hand-checked values, invariances, protocol subsampling, Metric classes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from scipy.spatial import procrustes
from scipy.spatial.distance import pdist
from scipy.stats import pearsonr, spearmanr

from dpvae.metrics import (
    LatentDistortion,
    SpatialScores,
    _knn,
    _knn_brute,
    best_scale_stress,
    dist_pearson,
    dist_spearman,
    distortion,
    knn_overlap,
    median_error,
    median_nn_distance,
    procrustes_rmse,
    protocol_subsample,
    score_coordinates,
)


def _noisy_pair(n: int = 400, dim: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """True coordinates and a noisy prediction of them."""
    rng = np.random.default_rng(seed)
    t = rng.random((n, dim)) * 100.0
    return t + rng.normal(scale=4.0, size=t.shape), t


def _rotation(theta: float) -> np.ndarray:
    """2-D rotation matrix."""
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s], [s, c]])


# ---------------------------------------------------------------------------------------------
# hand-checked values
# ---------------------------------------------------------------------------------------------
def test_perfect_prediction() -> None:
    _, t = _noisy_pair()
    scores = score_coordinates(t, t, "impute", ref_nn_distance=1.0)
    assert scores["dist_pearson"] == pytest.approx(1.0, abs=1e-12)
    assert scores["dist_spearman"] == pytest.approx(1.0, abs=1e-12)
    assert scores["knn10"] == 1.0
    assert scores["median_error"] == 0.0
    assert procrustes_rmse(t, t) == pytest.approx(0.0, abs=1e-9)


def test_known_permutation_of_three_cells() -> None:
    t = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])  # distances (01, 02, 12) = (1, 3, 2)
    p = t[[0, 2, 1]]  # distances (3, 1, 2): exactly anti-correlated
    assert dist_pearson(p, t) == pytest.approx(-1.0)
    assert dist_spearman(p, t) == pytest.approx(-1.0)


def test_knn_overlap_hand_built() -> None:
    # cells on a line; the prediction swaps the positions of cells 2 and 3
    t = np.array([0.0, 1.0, 2.0, 10.0, 11.0, 12.0])[:, None] * np.array([[1.0, 0.0]])
    p = t[[0, 1, 3, 2, 4, 5]]
    # k = 2 neighbour sets (ties -> lower index):
    #   T: {1,2} {0,2} {0,1} {4,5} {3,5} {3,4};  P: {1,3} {0,3} {4,5} {0,1} {2,5} {2,4}
    #   overlaps 1,1,0,0,1,1 of 2 -> 4 / 12
    assert knn_overlap(p, t, k=2) == pytest.approx(1.0 / 3.0)


def test_knn_ties_broken_by_lower_index() -> None:
    grid = np.array([[i, j] for i in range(3) for j in range(3)], dtype=float)
    # the centre (4) has four neighbours at distance 1: 1, 3, 5, 7 -> keeps 1 and 3
    assert _knn(grid, 2)[4].tolist() == [1, 3]
    assert _knn_brute(grid, 2)[4].tolist() == [1, 3]


@pytest.mark.parametrize("kind", ["random", "square", "hex", "collapsed"])
def test_knn_tree_equals_brute_force(kind: str) -> None:
    rng = np.random.default_rng(1)
    if kind == "random":
        x = rng.random((1500, 2))
    elif kind == "square":
        x = np.stack(np.meshgrid(np.arange(35), np.arange(35)), -1).reshape(-1, 2).astype(float)
    elif kind == "hex":  # Visium-like spot array, many exact ties
        r, c = np.meshgrid(np.arange(30), np.arange(40))
        x = np.stack([c + 0.5 * (r % 2), r * math.sqrt(3) / 2], -1).reshape(-1, 2) * 137.5
    else:  # a degenerate prediction: many cells on the same point
        x = np.repeat(rng.random((20, 2)), 30, axis=0)
    assert np.array_equal(_knn(x, 10), np.sort(_knn_brute(x, 10), axis=1))


def test_median_error_and_nn_distance_by_hand() -> None:
    t = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    p = t + np.array([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]])  # errors 5, 1, 10 -> median 5
    assert median_error(p, t, ref_nn_distance=2.5) == pytest.approx(2.0)
    ref = np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0], [7.0, 0.0]])  # nn: 1, 1, 2, 2
    assert median_nn_distance(ref) == pytest.approx(1.5)


def test_procrustes_rmse_by_hand_and_against_scipy() -> None:
    p, t = _noisy_pair(300)
    # scipy standardises both sets: disparity = ||Tc - s Pc R||^2 / ||Tc||^2 at the optimum
    _, _, disparity = procrustes(t, p)
    tc = t - t.mean(0)
    expected = math.sqrt(disparity * (tc**2).sum() / len(t)) / median_nn_distance(t)
    assert procrustes_rmse(p, t) == pytest.approx(expected, rel=1e-9)
    # a similarity transform of T is mapped back exactly
    moved = 3.0 * t @ _rotation(0.7) @ np.diag([1.0, -1.0]) + np.array([5.0, -2.0])
    assert procrustes_rmse(moved, t) == pytest.approx(0.0, abs=1e-9)


def test_correlations_equal_scipy_including_ties() -> None:
    rng = np.random.default_rng(2)
    t = rng.integers(0, 6, size=(80, 2)).astype(float)  # integer grid: many tied distances
    p = t + rng.integers(-1, 2, size=t.shape)
    dp, dt = pdist(p), pdist(t)
    assert dist_spearman(p, t) == pytest.approx(spearmanr(dp, dt).statistic, abs=1e-12)
    assert dist_pearson(p, t) == pytest.approx(pearsonr(dp, dt).statistic, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# invariances
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "transform",
    [
        lambda x: x @ _rotation(1.1).T,
        lambda x: x * np.array([-1.0, 1.0]),
        lambda x: x + np.array([250.0, -40.0]),
        lambda x: 0.37 * x,
        lambda x: 2.0 * (x * np.array([1.0, -1.0])) @ _rotation(-0.4).T + 7.0,
    ],
    ids=["rotation", "reflection", "translation", "scale", "all"],
)
def test_rigid_and_scale_invariance(transform) -> None:
    p, t = _noisy_pair()
    q = transform(p)
    assert dist_pearson(q, t) == pytest.approx(dist_pearson(p, t), abs=1e-10)
    assert dist_spearman(q, t) == pytest.approx(dist_spearman(p, t), abs=1e-10)
    assert knn_overlap(q, t) == knn_overlap(p, t)
    assert procrustes_rmse(q, t) == pytest.approx(procrustes_rmse(p, t), rel=1e-8)
    # the true side too (the query's own spacing normalises procrustes_rmse)
    assert procrustes_rmse(p, transform(t)) == pytest.approx(procrustes_rmse(p, t), rel=1e-8)


def test_median_error_is_not_invariant() -> None:
    p, t = _noisy_pair()
    base = median_error(p, t, ref_nn_distance=1.0)
    assert median_error(p + 50.0, t, ref_nn_distance=1.0) > base + 10.0
    assert median_error(p @ _rotation(1.0).T, t, ref_nn_distance=1.0) > base + 10.0


def test_torch_and_numpy_inputs_agree() -> None:
    p, t = _noisy_pair()
    a = score_coordinates(p, t, "transfer")
    b = score_coordinates(torch.from_numpy(p), torch.from_numpy(t), "transfer")
    assert a == b


# ---------------------------------------------------------------------------------------------
# protocol subsample (n > 3000)
# ---------------------------------------------------------------------------------------------
def test_protocol_subsample_is_used_above_3000() -> None:
    assert protocol_subsample(3000) is None
    p, t = _noisy_pair(3400, seed=3)
    sub = np.sort(np.random.default_rng(0).choice(3400, 3000, replace=False))
    assert np.array_equal(protocol_subsample(3400), sub)
    dp, dt = pdist(p[sub]), pdist(t[sub])
    assert dist_pearson(p, t) == pytest.approx(np.corrcoef(dp, dt)[0, 1], abs=1e-12)
    assert dist_spearman(p, t) == pytest.approx(spearmanr(dp, dt).statistic, abs=1e-12)
    assert dist_pearson(p, t) != pytest.approx(np.corrcoef(pdist(p), pdist(t))[0, 1], abs=1e-9)


# ---------------------------------------------------------------------------------------------
# latent diagnostics
# ---------------------------------------------------------------------------------------------
def test_distortion_and_stress_of_an_isometry() -> None:
    _, t = _noisy_pair(200)
    rng = np.random.default_rng(4)
    q, _ = np.linalg.qr(rng.normal(size=(16, 2)))
    z = 2.5 * t @ q.T
    d = distortion(z, t)
    assert d["distortion_max_min"] == pytest.approx(1.0, abs=1e-9)
    assert d["distortion_p95_p5"] == pytest.approx(1.0, abs=1e-9)
    assert best_scale_stress(z, t) == pytest.approx(0.0, abs=1e-12)


def test_distortion_by_hand() -> None:
    t = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])  # pair (0, 2) has d = 0 and is skipped
    z = np.array([[0.0], [2.0], [1.0]])  # ratios: (0,1) 2/1, (1,2) 1/1
    d = distortion(z, t)
    assert d["distortion_max_min"] == pytest.approx(2.0)
    p5, p95 = np.percentile([2.0, 1.0], [5, 95])
    assert d["distortion_p95_p5"] == pytest.approx(p95 / p5)


def test_best_scale_stress_is_the_minimum_over_scales() -> None:
    p, t = _noisy_pair(150)
    e, d = pdist(p), pdist(t)

    def ratio(s: float) -> float:
        return float(((e - s * d) ** 2).sum() / ((s * d) ** 2).sum())

    best = minimize_scalar(ratio, bounds=(0.1, 10.0), method="bounded", options={"xatol": 1e-12})
    assert best_scale_stress(p, t) == pytest.approx(best.fun, rel=1e-6)
    s_star = (e @ e) / (e @ d)
    assert ratio(s_star) == pytest.approx(best_scale_stress(p, t), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# input validation
# ---------------------------------------------------------------------------------------------
def test_functional_validation() -> None:
    p, t = _noisy_pair(50)
    with pytest.raises(ValueError, match="task"):
        score_coordinates(p, t, "bogus")
    with pytest.raises(ValueError, match="ref_nn_distance"):
        score_coordinates(p, t, "impute")
    with pytest.raises(ValueError, match="same number of cells"):
        dist_pearson(p[:10], t)
    with pytest.raises(ValueError, match="non-finite"):
        dist_pearson(np.full_like(p, np.nan), t)
    with pytest.raises(ValueError, match="more than k"):
        knn_overlap(p[:5], t[:5])
    with pytest.raises(ValueError, match="ref_nn_distance"):
        median_error(p, t, 0.0)


# ---------------------------------------------------------------------------------------------
# torchmetrics classes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["impute", "transfer"])
def test_spatial_scores_equals_functional_whatever_the_order(task: str) -> None:
    p, t = _noisy_pair(700, seed=5)
    ref_nn = 1.7 if task == "impute" else None
    expected = score_coordinates(p, t, task, ref_nn_distance=ref_nn)
    rng = np.random.default_rng(6)
    for splits in (1, 3, 11):
        metric = SpatialScores(task=task, ref_nn_distance=ref_nn)
        order = rng.permutation(len(p))
        for chunk in np.array_split(order, splits):
            metric.update(
                torch.from_numpy(p[chunk]), torch.from_numpy(t[chunk]), torch.from_numpy(chunk)
            )
        metric.update(torch.from_numpy(p[:9]), torch.from_numpy(t[:9]), torch.arange(9))  # padding
        got = {k: float(v) for k, v in metric.compute().items()}
        assert got == expected
        metric.reset()
        with pytest.warns(UserWarning), pytest.raises(ValueError, match="before any cell"):
            metric.compute()


def test_latent_distortion_equals_functional() -> None:
    p, t = _noisy_pair(300, seed=7)
    rng = np.random.default_rng(8)
    z = np.concatenate([p, rng.normal(size=(300, 6))], axis=1)
    metric = LatentDistortion()
    for chunk in np.array_split(rng.permutation(300), 4):
        metric.update(
            torch.from_numpy(z[chunk]).float(), torch.from_numpy(t[chunk]), torch.from_numpy(chunk)
        )
    got = {k: float(v) for k, v in metric.compute().items()}
    z32 = torch.from_numpy(z).float().double().numpy()
    expected = {**distortion(z32, t), "stress": best_scale_stress(z32, t)}
    assert got == expected


def test_metric_update_validation() -> None:
    metric = SpatialScores(task="transfer")
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="same number of rows"):
        metric.update(x, x, torch.arange(3))
    with pytest.raises(ValueError, match="integer"):
        metric.update(x, x, torch.arange(4.0))
    with pytest.raises(ValueError, match="widths differ"):
        metric.update(x, torch.zeros(4, 3), torch.arange(4))
    metric.reset()
    metric.update(x, x, torch.arange(4))
    with pytest.raises(ValueError, match="widths changed"):
        metric.update(torch.zeros(4, 3), torch.zeros(4, 3), torch.arange(4))
    with pytest.raises(ValueError, match="ref_nn_distance"):
        SpatialScores(task="impute")
    with pytest.raises(ValueError, match="task"):
        SpatialScores(task="bogus", ref_nn_distance=1.0)
