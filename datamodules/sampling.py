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

from dpvae.errors import check_pair_options


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


def _other_pairs(b: int) -> np.ndarray:
    """Every in-batch pair ``i < j`` of an (anchor, neighbour)-interleaved batch of ``b`` cells
    except the (2m, 2m + 1) neighbour pairs, shape (2, b(b-1)/2 - b/2)."""
    i, j = np.triu_indices(b, k=1)
    keep = ~((i % 2 == 0) & (j == i + 1))
    return np.stack([i[keep], j[keep]]).astype(np.int64)


class _EpochHook:
    """What Lightning calls ``set_epoch`` on: it looks for ``dataloader.sampler`` and
    ``dataloader.batch_sampler.sampler``, never the batch sampler itself."""

    def __init__(self, owner: PairedBatchSampler) -> None:
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)


class PairedBatchSampler(Sampler[BatchPlan]):
    """Batches of anchor cells each followed by one of its spatial neighbours.

    Every epoch visits the cells in a new random order as anchors; each anchor brings one random cell
    among its ``k`` nearest spatial neighbours, so short distances are always among a batch's pairs
    while the other in-batch pairs cover random far distances. Under DDP each rank takes a disjoint
    slice of the epoch's order (no padding, no duplicates; up to ``world_size - 1`` cells per epoch
    are left out, a different few each epoch), and every rank gets the same number of batches.

    With ``pair_set`` (and neighbours), each batch carries its pair set: the (anchor, neighbour)
    pairs, which together weigh ``near_weight`` of the regularizer, and far pairs sharing the rest:
    ``far_pairs`` random pairs of distinct in-batch cells, or with ``far_pairs=0`` every other
    in-batch pair. Without ``pair_set`` the batch has none and the model scores every in-batch pair
    with equal weight (a 256-cell batch: 32,640 pairs, of which its 128 neighbour pairs weigh 0.4%).

    Args:
        n: number of cells (local row ids ``0 .. n - 1``).
        neighbours: (n, k) indices of each cell's spatial neighbours (local row ids), or ``None``
            for plain random batches.
        batch_size: cells per batch (anchors + neighbours).
        seed: base seed; the order depends on (seed, epoch) only.
        rank, world_size: this process's shard.
        pair_set: attach the neighbour and far pairs with their weights to every batch.
        far_pairs: far pairs per batch (0: every in-batch pair that is not a neighbour pair).
        near_weight: share of the regularizer carried by the neighbour pairs, in (0, 1).
    """

    def __init__(
        self,
        n: int,
        neighbours: np.ndarray | None,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pair_set: bool = False,
        far_pairs: int = 0,
        near_weight: float = 0.1,
    ) -> None:
        check_pair_options(far_pairs, near_weight)
        self.n = n
        self.neighbours = neighbours
        self.per_batch = max(batch_size // 2, 1) if neighbours is not None else batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.pair_set = pair_set
        self.far_pairs = far_pairs
        self.near_weight = near_weight
        self.epoch = 0
        self._others: dict[int, np.ndarray] = {}
        #: Lightning's hook (``batch_sampler.sampler.set_epoch``): a new order every epoch
        self.sampler = _EpochHook(self)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch (through :attr:`sampler`)."""
        self.epoch = epoch

    def _shard_size(self) -> int:
        return self.n // self.world_size if self.world_size > 1 else self.n

    def __len__(self) -> int:
        return math.ceil(self._shard_size() / self.per_batch)

    def _plan(self, rows: np.ndarray, b: int) -> BatchPlan:
        """The plan of an interleaved (anchor, neighbour) batch with its pair set."""
        m = len(rows) // 2
        near = np.stack([np.arange(0, 2 * m, 2), np.arange(1, 2 * m, 2)]).astype(np.int64)
        if self.far_pairs == 0:
            if len(rows) not in self._others:
                self._others[len(rows)] = _other_pairs(len(rows))
            far = self._others[len(rows)]
        else:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, b, 2])
            i = rng.integers(0, len(rows), size=self.far_pairs)
            j = rng.integers(0, len(rows) - 1, size=self.far_pairs)
            j = j + (j >= i)  # distinct from i
            far = np.stack([np.minimum(i, j), np.maximum(i, j)]).astype(np.int64)
        n_near, n_far = near.shape[1], far.shape[1]
        if n_far == 0:  # a two-cell batch: its one neighbour pair is the whole term
            return BatchPlan(rows, near, np.ones(n_near, dtype=np.float32))
        weights = np.concatenate(
            [
                np.full(n_near, self.near_weight / n_near, dtype=np.float32),
                np.full(n_far, (1.0 - self.near_weight) / n_far, dtype=np.float32),
            ]
        )
        return BatchPlan(rows, np.concatenate([near, far], axis=1), weights)

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
                rows = np.stack([anchors, mates], axis=1).ravel()
                yield self._plan(rows, b) if self.pair_set else BatchPlan(rows)


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
