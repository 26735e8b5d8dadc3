"""Which cells go into each batch, and which of their pairs the distance regularizer sees.

A batch sampler here yields :class:`BatchPlan` objects; a dataset's ``__getitems__`` fetches the
plan's rows and :meth:`BatchPlan.attach` adds the pair set to the batch dict, so that the module
scores exactly the pairs the sampler chose (``batch["pairs"]``, ``batch["pair_weight"]``; absent:
every in-batch pair, equally weighted).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Sampler


@dataclass
class BatchPlan:
    """The rows of one batch and, optionally, its pair set.

    Attributes:
        rows: dataset row ids, in batch order.
        pairs: (2, P) positions in ``rows`` of the pairs the regularizer scores, or ``None`` for
            every in-batch pair.
        weights: (P,) weight of each pair (``None``: equal weights).
    """

    rows: np.ndarray
    pairs: np.ndarray | None = None
    weights: np.ndarray | None = None

    def attach(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Add ``pairs`` (and ``pair_weight``) to a fetched batch."""
        if self.pairs is not None:
            batch["pairs"] = torch.as_tensor(self.pairs, dtype=torch.int64)
            if self.weights is not None:
                batch["pair_weight"] = torch.as_tensor(self.weights, dtype=torch.float32)
        return batch


def as_plan(rows: BatchPlan | Sequence[int] | np.ndarray) -> BatchPlan:
    """A plan from what a batch sampler yielded (a plan, or plain row ids)."""
    if isinstance(rows, BatchPlan):
        return rows
    return BatchPlan(np.asarray(rows, dtype=np.int64))


class PairedBatchSampler(Sampler[BatchPlan]):
    """Batches of anchor cells each followed by one of its spatial neighbours.

    Every epoch visits the cells in a new random order as anchors; each anchor brings one random cell
    among its ``k`` nearest spatial neighbours, so short distances are always among a batch's pairs
    while the other in-batch pairs cover random far distances. Under DDP each rank takes a disjoint
    slice of the epoch's order (no padding, no duplicates; up to ``world_size - 1`` cells per epoch
    are left out, a different few each epoch), and every rank gets the same number of batches.

    Args:
        neighbours: (n, k) indices of each cell's spatial neighbours (local row ids), or ``None``
            for plain random batches.
        batch_size: cells per batch (anchors + neighbours).
        seed: base seed; the order depends on (seed, epoch) only.
        rank, world_size: this process's shard.
    """

    def __init__(
        self,
        n: int,
        neighbours: np.ndarray | None,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.n = n
        self.neighbours = neighbours
        self.per_batch = max(batch_size // 2, 1) if neighbours is not None else batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def _shard_size(self) -> int:
        return self.n // self.world_size if self.world_size > 1 else self.n

    def __len__(self) -> int:
        return math.ceil(self._shard_size() / self.per_batch)

    def __iter__(self) -> Iterator[BatchPlan]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.n)
        m = self._shard_size()
        shard = order[self.rank * m : (self.rank + 1) * m]
        partner = None
        if self.neighbours is not None:
            pick = np.random.default_rng([self.seed, self.epoch, 1 + self.rank]).integers(
                0, self.neighbours.shape[1], size=len(shard)
            )
            partner = self.neighbours[shard, pick]
        for b in range(len(self)):
            anchors = shard[b * self.per_batch : (b + 1) * self.per_batch]
            if partner is None:
                yield BatchPlan(anchors)
            else:
                mates = partner[b * self.per_batch : (b + 1) * self.per_batch]
                yield BatchPlan(np.stack([anchors, mates], axis=1).ravel())


class FixedBatches(Sampler[BatchPlan]):
    """Consecutive batches over a fixed list of rows."""

    def __init__(self, rows: np.ndarray, batch_size: int) -> None:
        self.rows = np.asarray(rows)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def __iter__(self) -> Iterator[BatchPlan]:
        for start in range(0, len(self.rows), self.batch_size):
            yield BatchPlan(self.rows[start : start + self.batch_size])
