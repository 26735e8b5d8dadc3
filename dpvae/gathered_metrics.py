"""The benchmark's scores as torchmetrics ``Metric`` s, for validation during training.

:class:`SpatialScores` and :class:`LatentDistortion` gather rows with a global cell ``index`` and
sort (and de-duplicate) them by it before scoring, so the result does not depend on update order,
batching or how cells were sharded over DDP processes. The scores themselves are
:mod:`dpvae.metrics`'s functions; this module is apart so that prediction, which needs only
those, does not import torchmetrics (1 s of start-up).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from dpvae.metrics import (
    _TASK_KEYS,
    _pair_distances,
    _pearson,
    _spearman,
    best_scale_stress,
    distortion,
    knn_overlap,
    median_error,
    procrustes_rmse,
)


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
