"""Scores of the spatial reconstruction benchmark, as functions and as torchmetrics ``Metric`` s.

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
the CPU. :class:`SpatialScores` and :class:`LatentDistortion` gather rows with a global cell
``index`` and sort (and de-duplicate) them by it before scoring, so the result does not depend on
update order, batching or how cells were sharded over DDP processes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.spatial import cKDTree
from scipy.spatial.distance import pdist
from scipy.stats import rankdata
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = [
    "SUBSAMPLE_N",
    "LatentDistortion",
    "SpatialScores",
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
            ``"transfer"`` -> dist_pearson, dist_spearman, knn10, procrustes_rmse.
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
        "knn10": knn_overlap(p, t, k=10),
    }
    if task == "impute":
        assert ref_nn_distance is not None
        out["median_error"] = median_error(p, t, ref_nn_distance)
    else:
        out["procrustes_rmse"] = procrustes_rmse(p, t)
    return out


# --------------------------------------------------------------------------------------------------
# torchmetrics
# --------------------------------------------------------------------------------------------------
class _IndexedRows(Metric):
    """Base metric that collects (pred, target, index) rows and scores them sorted by index.

    States ``pred``, ``target`` and ``index`` are lists reduced with ``"cat"``. They are stored
    flattened (1-D) in the metric's dtype, which is set to float64 at construction: torchmetrics
    fills the state of a process that saw no update with a 1-D empty tensor of the metric's dtype
    before the all-gather, so 1-D states of one dtype keep DDP working even when one rank has no
    cells. ``index`` is therefore exact up to 2**53 (2**24 after ``set_dtype(torch.float32)``).
    Row widths are recovered from the element counts in :meth:`_rows`.
    """

    is_differentiable = False
    higher_is_better: bool | None = None
    full_state_update = False

    pred: list[Tensor] | Tensor
    target: list[Tensor] | Tensor
    index: list[Tensor] | Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("pred", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")
        self.set_dtype(torch.float64)
        self._widths: tuple[int, int] | None = None

    def _append(self, pred: Tensor, target: Tensor, index: Tensor, names: tuple[str, str]) -> None:
        """Validate one batch and append it to the states."""
        pred = torch.as_tensor(pred)
        target = torch.as_tensor(target)
        index = torch.as_tensor(index)
        if pred.ndim != 2 or target.ndim != 2:
            raise ValueError(
                f"{names[0]} and {names[1]} must be 2-D (cells x dims), got shapes "
                f"{tuple(pred.shape)} and {tuple(target.shape)}"
            )
        if index.ndim != 1 or not (pred.shape[0] == target.shape[0] == index.shape[0]):
            raise ValueError(
                f"{names[0]}, {names[1]} and index must have the same number of rows (index 1-D),"
                f" got {tuple(pred.shape)}, {tuple(target.shape)} and {tuple(index.shape)}"
            )
        if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
            raise ValueError(f"index must hold integer cell ids, got dtype {index.dtype}")
        widths = (int(pred.shape[1]), int(target.shape[1]))
        if self._widths is not None and widths != self._widths:
            raise ValueError(f"row widths changed between updates: {self._widths} -> {widths}")
        exact = int(2.0 / torch.finfo(self.dtype).eps)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) > exact):
            raise ValueError(f"index must lie in [0, {exact}] (exact in {self.dtype})")
        self._widths = widths
        dev, dt = self.device, self.dtype
        assert isinstance(self.pred, list)
        assert isinstance(self.target, list) and isinstance(self.index, list)
        self.pred.append(pred.detach().to(dev, dt).reshape(-1))
        self.target.append(target.detach().to(dev, dt).reshape(-1))
        self.index.append(index.detach().to(dev, dt))

    def reset(self) -> None:
        """Clear the states (and the remembered row widths)."""
        super().reset()
        self._widths = None

    def _rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Gathered rows sorted by index, duplicates dropped, as float64 numpy arrays."""
        index = dim_zero_cat(self.index) if len(self.index) else torch.empty(0)
        m = int(index.numel())
        if m == 0:
            raise ValueError(f"{type(self).__name__}.compute() called before any cell was added")
        pred = dim_zero_cat(self.pred)
        target = dim_zero_cat(self.target)
        if pred.numel() % m or target.numel() % m:
            raise ValueError("inconsistent state sizes: pred/target rows do not match index")
        pred = pred.reshape(m, pred.numel() // m)
        target = target.reshape(m, target.numel() // m)
        ids = index.round().to(torch.int64)
        order = torch.argsort(ids, stable=True)
        ids = ids[order]
        first = torch.ones_like(ids, dtype=torch.bool)
        first[1:] = ids[1:] != ids[:-1]
        keep = order[first]
        return (
            pred[keep].to("cpu", torch.float64).numpy(),
            target[keep].to("cpu", torch.float64).numpy(),
        )

    def _out(self, values: dict[str, float]) -> dict[str, Tensor]:
        """Scores as 0-d tensors on the metric's device."""
        return {k: torch.tensor(v, dtype=self.dtype, device=self.device) for k, v in values.items()}


class SpatialScores(_IndexedRows):
    """Protocol scores of predicted coordinates, gathered across batches and DDP processes.

    ``update(pred, target, index)`` takes (b, d) predicted and true coordinates and the (b,)
    global cell ids (LongTensor). ``compute()`` sorts all rows by id, drops duplicated ids (e.g.
    ``DistributedSampler`` padding; duplicates are assumed to carry the same values) and returns
    ``{"dist_pearson", "dist_spearman", "knn{k}", "median_error"}`` for ``task="impute"`` or
    ``{..., "procrustes_rmse"}`` for ``task="transfer"`` as float64 0-d tensors, equal to
    :func:`score_coordinates` on the sorted rows whatever the order or sharding of updates.
    Every rank must call ``compute()`` (it is a collective under DDP).

    Args:
        task: ``"impute"`` or ``"transfer"``.
        ref_nn_distance: reference median nearest-neighbour distance (required for impute;
            :func:`median_nn_distance` of the reference coordinates).
        k: neighbours of the kNN-overlap score (key ``f"knn{k}"``).
        **kwargs: torchmetrics ``Metric`` keyword arguments.
    """

    def __init__(
        self,
        task: str = "impute",
        ref_nn_distance: float | None = None,
        k: int = 10,
        **kwargs: Any,
    ) -> None:
        if task not in _TASK_KEYS:
            raise ValueError(f"task must be one of {sorted(_TASK_KEYS)}, got {task!r}")
        if task == "impute":
            if ref_nn_distance is None:
                raise ValueError(
                    "task='impute' needs ref_nn_distance (median_nn_distance of the reference)"
                )
            if not (float(ref_nn_distance) > 0.0 and np.isfinite(ref_nn_distance)):
                raise ValueError(f"ref_nn_distance must be finite and > 0, got {ref_nn_distance!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        super().__init__(**kwargs)
        self.task = task
        self.ref_nn_distance = None if ref_nn_distance is None else float(ref_nn_distance)
        self.k = k

    def update(self, pred: Tensor, target: Tensor, index: Tensor) -> None:  # type: ignore[override]
        """Add a batch: (b, d) predicted and true coordinates, (b,) integer cell ids."""
        self._append(pred, target, index, ("pred", "target"))
        if self._widths is not None and self._widths[0] != self._widths[1]:
            raise ValueError(f"pred and target widths differ: {self._widths}")

    def compute(self) -> dict[str, Tensor]:
        """Scores on all gathered cells (sorted by index, duplicates dropped)."""
        p, t = self._rows()
        dp, dt = _pair_distances(p, t)
        out = {
            "dist_pearson": _pearson(dp, dt),
            "dist_spearman": _spearman(dp, dt),
            f"knn{self.k}": knn_overlap(p, t, k=self.k),
        }
        if self.task == "impute":
            assert self.ref_nn_distance is not None
            out["median_error"] = median_error(p, t, self.ref_nn_distance)
        else:
            out["procrustes_rmse"] = procrustes_rmse(p, t)
        return self._out(out)


class LatentDistortion(_IndexedRows):
    """How far latent distances are from a scaled copy of the physical ones.

    ``update(latent, target, index)`` takes (b, q) latent codes (kept in the ``pred`` state), (b, d)
    true coordinates and (b,) global cell ids. ``compute()`` sorts by id, drops duplicates and
    returns ``{"distortion_max_min", "distortion_p95_p5", "stress"}`` (see :func:`distortion`
    and :func:`best_scale_stress`) as float64 0-d tensors.
    """

    def update(self, latent: Tensor, target: Tensor, index: Tensor) -> None:  # type: ignore[override]
        """Add a batch: (b, q) latent codes, (b, d) true coordinates, (b,) integer cell ids."""
        self._append(latent, target, index, ("latent", "target"))

    def compute(self) -> dict[str, Tensor]:
        """Distortion ratios and best-scale stress on all gathered cells."""
        z, t = self._rows()
        out = distortion(z, t)
        out["stress"] = best_scale_stress(z, t)
        return self._out(out)


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
