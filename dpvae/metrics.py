"""Scores of the spatial reconstruction benchmark, as functions.

Definitions follow the project's protocol (``BENCHMARK.md``). ``P`` are predicted and ``T`` true
coordinates of the same ``n`` query cells, rows aligned:

- ``dist_pearson`` / ``dist_spearman``: Pearson / Spearman (average ranks for ties) correlation
  between the ``n(n-1)/2`` pairwise Euclidean distances of ``P`` and of ``T``. Where
  ``n > 3000`` both use only the cells
  ``np.sort(np.random.default_rng(0).choice(n, 3000, replace=False))``.
- ``knn10``: mean over all cells of the fraction of its 10 nearest neighbours in ``T`` (itself
  excluded) that are also among its 10 nearest in ``P``. Ties in distance are broken by the lower
  cell index, so the score is deterministic on regular grids (Visium spots).
- ``median_error`` (impute): ``median_i ||P_i - T_i||`` divided by the reference's median
  nearest-neighbour distance (:func:`median_nn_distance`).
- ``procrustes_rmse`` (transfer): ``sqrt(mean_i ||T_i - (s P_i R + b)||^2)`` for the rotation or
  reflection ``R``, translation ``b`` and uniform scale ``s`` minimising it, divided by the median
  nearest-neighbour distance of ``T``.

Two latent-space diagnostics are added: :func:`distortion` and :func:`best_scale_stress`.

Functions accept torch tensors or numpy arrays and return Python floats; they compute in float64 on
the CPU. The same scores as torchmetrics ``Metric`` s, gathered across DDP processes, are
:class:`dpvae.gathered_metrics.SpatialScores` and :class:`~dpvae.gathered_metrics.LatentDistortion`
(also importable from here); this module does not import torchmetrics, so prediction does not.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.spatial import cKDTree
from scipy.spatial.distance import pdist
from torch import Tensor

__all__ = [
    "SUBSAMPLE_N",
    "best_scale_stress",
    "dist_pearson",
    "dist_spearman",
    "distortion",
    "knn_overlap",
    "median_error",
    "median_nn_distance",
    "procrustes_rmse",
    "protocol_subsample",
    "score_coordinates",
]

#: Above this many cells the pairwise-distance scores use a fixed random subset of this size.
SUBSAMPLE_N = 3000
#: Seed of ``numpy.random.default_rng`` drawing that subset (protocol).
SUBSAMPLE_SEED = 0
#: Number of query rows per chunk in the brute-force neighbour search.
_KNN_CHUNK = 256

ArrayLike = Tensor | np.ndarray


# --------------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------------
def _as_array(x: Any, name: str) -> np.ndarray:
    """``x`` as a finite 2-D float64 numpy array (torch tensors are detached and moved to CPU)."""
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (cells x dims), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains non-finite values")
    return arr


def _pair(P: Any, T: Any, same_width: bool = True, names: tuple[str, str] = ("P", "T")):
    """Validate two row-aligned arrays; returns them as float64 numpy arrays."""
    p = _as_array(P, names[0])
    t = _as_array(T, names[1])
    if p.shape[0] != t.shape[0]:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same number of cells, got {p.shape[0]} "
            f"and {t.shape[0]}"
        )
    if same_width and p.shape[1] != t.shape[1]:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same number of dimensions, got "
            f"{p.shape[1]} and {t.shape[1]}"
        )
    return p, t


def protocol_subsample(n: int) -> np.ndarray | None:
    """The protocol's cell subset for pairwise-distance scores, or None when ``n <= 3000``.

    Exactly ``np.sort(np.random.default_rng(0).choice(n, 3000, replace=False))``.
    """
    if n <= SUBSAMPLE_N:
        return None
    return np.sort(np.random.default_rng(SUBSAMPLE_SEED).choice(n, SUBSAMPLE_N, replace=False))


def _pair_distances(p: np.ndarray, t: np.ndarray, min_cells: int = 3):
    """Condensed pairwise distances of both arrays, on the protocol subset where n > 3000."""
    n = p.shape[0]
    if n < min_cells:
        raise ValueError(f"need at least {min_cells} cells for distance scores, got {n}")
    sub = protocol_subsample(n)
    if sub is not None:
        p, t = p[sub], t[sub]
    return pdist(p), pdist(t)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two vectors (nan when either is constant)."""
    ac = a - a.mean()
    bc = b - b.mean()
    denom = np.sqrt(np.dot(ac, ac) * np.dot(bc, bc))
    if denom == 0.0:
        return float("nan")
    return float(np.clip(np.dot(ac, bc) / denom, -1.0, 1.0))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation: Pearson correlation of average ranks."""
    from scipy.stats import rankdata  # imported when used: scipy.stats takes 0.5-0.8 s

    return _pearson(rankdata(a, method="average"), rankdata(b, method="average"))


# --------------------------------------------------------------------------------------------------
# scores
# --------------------------------------------------------------------------------------------------
def dist_pearson(P: ArrayLike, T: ArrayLike) -> float:
    """Pearson correlation between the pairwise distances of ``P`` and of ``T`` (1 is perfect).

    Uses the protocol's 3000-cell subset where n > 3000. Returns nan if either set of distances
    is constant. Raises ValueError on mismatched shapes, non-finite values or fewer than 3 cells.
    """
    dp, dt = _pair_distances(*_pair(P, T))
    return _pearson(dp, dt)


def dist_spearman(P: ArrayLike, T: ArrayLike) -> float:
    """Spearman correlation (average ranks) between the pairwise distances of ``P`` and ``T``.

    Same subset and validation as :func:`dist_pearson`.
    """
    dp, dt = _pair_distances(*_pair(P, T))
    return _spearman(dp, dt)


def _sq_dists(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Squared distances from ``x[rows]`` to all rows of ``x``, coordinate by coordinate.

    Summing per-coordinate squared differences (rather than ``|a|^2 + |b|^2 - 2ab``) keeps equal
    geometric distances bitwise equal, which the tie-breaking relies on.
    """
    d2 = np.zeros((rows.shape[0], x.shape[0]))
    for j in range(x.shape[1]):  # loop over the 2-3 coordinates, not over cells
        d2 += (x[rows, j][:, None] - x[None, :, j]) ** 2
    return d2


def _knn_brute(x: np.ndarray, k: int, rows: np.ndarray | None = None) -> np.ndarray:
    """k nearest neighbours (self excluded) of ``x[rows]``, ties broken by lower index; chunked.

    Returns an (len(rows), k) int array (columns in increasing index order, not by distance).
    """
    n = x.shape[0]
    rows = np.arange(n) if rows is None else rows
    out = np.empty((rows.shape[0], k), dtype=np.int64)
    for start in range(0, rows.shape[0], _KNN_CHUNK):
        r = rows[start : start + _KNN_CHUNK]
        d2 = _sq_dists(x, r)
        d2[np.arange(r.shape[0]), r] = np.inf
        kth = np.partition(d2, k - 1, axis=1)[:, k - 1 : k]
        less = d2 < kth
        need = k - less.sum(axis=1, keepdims=True)
        equal = d2 == kth
        chosen = less | (equal & (np.cumsum(equal, axis=1) <= need))
        out[start : start + r.shape[0]] = np.nonzero(chosen)[1].reshape(r.shape[0], k)
    return out


def _knn(x: np.ndarray, k: int) -> np.ndarray:
    """k nearest neighbours of every row (self excluded), ties broken by lower index.

    A KD-tree proposes ``2k + 1`` candidates per cell; their squared distances are recomputed
    exactly, and a row is accepted when its k-th candidate distance is strictly below the distance
    of every cell the tree left out (so no tie can reach beyond the candidates). Rejected rows (many
    exact ties, e.g. collapsed predictions) fall back to the exact chunked brute force. Same result
    as :func:`_knn_brute` in O(n log n) for typical data.
    """
    n = x.shape[0]
    if n <= k:
        raise ValueError(f"knn needs more than k = {k} cells, got {n}")
    m = min(n, 2 * k + 1)
    far, cand = cKDTree(x).query(x, k=m)
    cand = cand.astype(np.int64)
    d2 = ((x[cand] - x[:, None, :]) ** 2).sum(axis=-1)
    d2[cand == np.arange(n)[:, None]] = np.inf
    order = np.lexsort((cand, d2), axis=-1)[:, :k]
    nn = np.take_along_axis(cand, order, axis=1)
    if m < n:
        kth = np.sqrt(np.take_along_axis(d2, order[:, k - 1 : k], axis=1))[:, 0]
        bad = np.nonzero(~(kth < far[:, -1] * (1.0 - 1e-9)))[0]
        if bad.size:
            nn[bad] = _knn_brute(x, k, bad)
    return np.sort(nn, axis=1)


def knn_overlap(P: ArrayLike, T: ArrayLike, k: int = 10) -> float:
    """Mean over cells of |kNN_T(i) & kNN_P(i)| / k, neighbours among all cells, self excluded.

    Invariant under rigid motions and uniform scaling of either set. Ties broken by lower index.
    Raises ValueError if n <= k or shapes differ.
    """
    p, t = _pair(P, T)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    nn_p = _knn(p, k)
    nn_t = _knn(t, k)
    hits = np.zeros(p.shape[0], dtype=np.int64)
    for j in range(k):  # k x k membership test, vectorised over cells
        hits += (nn_t == nn_p[:, j : j + 1]).any(axis=1)
    return float(hits.mean() / k)


def median_nn_distance(coords: ArrayLike) -> float:
    """Median over cells of the distance to the nearest other cell (KD-tree, O(n log n))."""
    x = _as_array(coords, "coords")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 cells, got {x.shape[0]}")
    dist, _ = cKDTree(x).query(x, k=2)
    return float(np.median(dist[:, 1]))


def median_error(P: ArrayLike, T: ArrayLike, ref_nn_distance: float) -> float:
    """``median_i ||P_i - T_i|| / ref_nn_distance``: error in reference cell spacings (0 is best).

    ``ref_nn_distance`` is :func:`median_nn_distance` of the reference coordinates. Not invariant
    under rigid motions (predictions must be in the reference frame).
    """
    p, t = _pair(P, T)
    if p.shape[0] == 0:
        raise ValueError("need at least one cell")
    if not (float(ref_nn_distance) > 0.0 and np.isfinite(ref_nn_distance)):
        raise ValueError(f"ref_nn_distance must be finite and > 0, got {ref_nn_distance!r}")
    return float(np.median(np.linalg.norm(p - t, axis=1)) / float(ref_nn_distance))


def procrustes_rmse(P: ArrayLike, T: ArrayLike) -> float:
    """RMSE of ``T`` against the best similarity transform of ``P``, in the query's cell spacings.

    With ``Pc``, ``Tc`` centred and ``U S V^T`` the SVD of ``Pc^T Tc``: ``R = U V^T`` (reflections
    allowed), ``s = trace(S) / ||Pc||_F^2``, residual ``Tc - s Pc R``; returns
    ``sqrt(mean_i ||residual_i||^2) / median_nn_distance(T)``. Invariant under rotation,
    reflection, translation and uniform scaling of ``P``.
    """
    p, t = _pair(P, T)
    pc = p - p.mean(axis=0)
    tc = t - t.mean(axis=0)
    u, sing, vt = np.linalg.svd(pc.T @ tc)
    norm2 = float((pc**2).sum())
    scale = float(sing.sum()) / norm2 if norm2 > 0 else 0.0
    resid = tc - scale * (pc @ (u @ vt))
    rmse = float(np.sqrt((resid**2).sum(axis=1).mean()))
    spacing = median_nn_distance(t)
    if spacing <= 0:
        raise ValueError("the median nearest-neighbour distance of T is 0 (duplicated cells)")
    return rmse / spacing


def _latent_pairs(Z: ArrayLike, T: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Pairwise latent and physical distances (protocol subset where n > 3000)."""
    z, t = _pair(Z, T, same_width=False, names=("Z", "T"))
    return _pair_distances(z, t, min_cells=2)


def distortion(Z: ArrayLike, T: ArrayLike) -> dict[str, float]:
    """Distortion of the latent metric: ratios ``r_ij = ||z_i - z_j|| / d_ij`` over pairs d_ij > 0.

    Returns ``{"distortion_max_min": max r / min r, "distortion_p95_p5": p95(r) / p5(r)}``
    (numpy's linear-interpolation percentiles; inf when the denominator is 0). Both are 1 for a
    perfect (scaled) isometry. Uses the protocol's 3000-cell subset where n > 3000.
    """
    e, d = _latent_pairs(Z, T)
    keep = d > 0
    if not keep.any():
        raise ValueError("all physical distances are 0")
    r = e[keep] / d[keep]
    lo, hi = float(r.min()), float(r.max())
    p5, p95 = np.percentile(r, [5.0, 95.0])
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "distortion_max_min": float(np.divide(hi, lo)) if lo > 0 else float("inf"),
            "distortion_p95_p5": float(p95 / p5) if p5 > 0 else float("inf"),
        }


def best_scale_stress(Z: ArrayLike, T: ArrayLike) -> float:
    """Normalised stress of latent distances ``e`` against physical ``d`` at the best scale.

    ``min_s sum_ij (e_ij - s d_ij)^2 / sum_ij (s d_ij)^2 = 1 - (sum e d)^2 / (sum e^2 sum d^2)``,
    attained at ``s* = sum e^2 / sum e d`` (closed form: with ``u = 1/s`` the ratio is a quadratic
    in ``u``). The sum runs over all pairs ``i < j`` (protocol subset where n > 3000). In [0, 1],
    0 for a perfect scaled isometry, invariant to scaling either side; nan if either side is all 0.
    """
    e, d = _latent_pairs(Z, T)
    ee, dd, ed = float(e @ e), float(d @ d), float(e @ d)
    if ee == 0.0 or dd == 0.0:
        return float("nan")
    return float(max(0.0, 1.0 - ed * ed / (ee * dd)))


_TASK_KEYS = {
    "impute": ("dist_pearson", "dist_spearman", "knn10", "median_error"),
    "transfer": ("dist_pearson", "dist_spearman", "knn10", "procrustes_rmse"),
}


def score_coordinates(
    P: ArrayLike, T: ArrayLike, task: str, ref_nn_distance: float | None = None
) -> dict[str, float]:
    """All protocol scores of one prediction.

    Args:
        P: (n, d) predicted coordinates of the query cells.
        T: (n, d) true coordinates, rows aligned with ``P``.
        task: ``"impute"`` -> dist_pearson, dist_spearman, knn10, median_error;
            ``"transfer"`` -> dist_pearson, dist_spearman, knn10, procrustes_rmse (knn10 is NaN
            for 10 cells or fewer).
        ref_nn_distance: reference median nearest-neighbour distance (required for impute).

    Returns:
        Mapping of score name to float.

    Raises:
        ValueError: on an unknown task, a missing ``ref_nn_distance`` for impute, or bad input.
    """
    if task not in _TASK_KEYS:
        raise ValueError(f"task must be one of {sorted(_TASK_KEYS)}, got {task!r}")
    if task == "impute" and ref_nn_distance is None:
        raise ValueError(
            "task='impute' needs ref_nn_distance (median_nn_distance of the reference)"
        )
    p, t = _pair(P, T)
    dp, dt = _pair_distances(p, t)
    out = {
        "dist_pearson": _pearson(dp, dt),
        "dist_spearman": _spearman(dp, dt),
        # a query of 10 cells or fewer has no 10 neighbours a cell: no knn10
        "knn10": knn_overlap(p, t, k=10) if len(p) > 10 else float("nan"),
    }
    if task == "impute":
        assert ref_nn_distance is not None
        out["median_error"] = median_error(p, t, ref_nn_distance)
    else:
        out["procrustes_rmse"] = procrustes_rmse(p, t)
    return out


def __getattr__(name: str) -> Any:
    """:class:`SpatialScores` and :class:`LatentDistortion`, imported (with torchmetrics) on use."""
    if name in ("SpatialScores", "LatentDistortion"):
        from dpvae import gathered_metrics

        return getattr(gathered_metrics, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: scores measured in cell spacings (the reference's median nearest-neighbour distance)
def radius_scores(P: np.ndarray, T: np.ndarray, radius: np.ndarray) -> dict[str, float]:
    """``coverage90``: the fraction of cells with ``||P_i - T_i|| <= r_i``; ``radius_spearman``:
    Spearman correlation of ``r_i`` and ``||P_i - T_i||`` (NaN when either is constant).

    A NaN radius is a cell the method makes no claim for: it counts as not covered and is left
    out of the correlation.

    Raises:
        ValueError: a radius per cell is missing, negative or infinite, or every radius is NaN.
    """
    from scipy.stats import spearmanr

    r = np.asarray(radius, dtype=np.float64)
    if r.shape != (P.shape[0],):
        raise ValueError(f"radius has shape {r.shape}, expected ({P.shape[0]},)")
    known = ~np.isnan(r)
    if not known.any() or np.isinf(r).any() or (r[known] < 0).any():
        raise ValueError("radius must be non-negative and finite (NaN: no claim), not all NaN")
    err = np.linalg.norm(P - T, axis=1)
    covered = known & (err <= np.where(known, r, 0.0))
    rk, ek = r[known], err[known]
    if rk.size < 2 or np.ptp(rk) == 0 or np.ptp(ek) == 0:
        rho = float("nan")
    else:
        rho = float(spearmanr(rk, ek).statistic)
    return {"coverage90": float(np.mean(covered)), "radius_spearman": rho}


IN_CELL_SPACINGS = ("median_error", "procrustes_rmse")


def format_scores(scores: dict[str, float], sep: str = "  ") -> str:
    """``dist_pearson 0.612  knn10 0.081  median_error 1.93 cell spacings``: scores with units."""
    parts = []
    for name, value in scores.items():
        if name in IN_CELL_SPACINGS:
            parts.append(f"{name} {value:.2f} cell spacings")
        elif name.startswith("distortion"):
            parts.append(f"{name} {value:.2f}")
        else:
            parts.append(f"{name} {value:.3f}")
    return sep.join(parts)
