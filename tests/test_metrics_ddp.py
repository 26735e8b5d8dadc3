"""DDP test of the metric classes: 2 CPU processes (gloo) equal one process, bit for bit.

Each rank updates with a different, uneven, shuffled shard of the same cells (one scenario adds
``DistributedSampler``-style padding duplicates, another leaves rank 1 without any cell); every
rank calls ``compute()``, which all-gathers the states, and must get the single-process value.
"""

from __future__ import annotations

import socket
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dpvae.metrics import LatentDistortion, SpatialScores

WORLD = 2
REF_NN = 1.3


def _free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _data(n: int = 900, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Predicted coordinates, true coordinates and latent codes of n cells."""
    rng = np.random.default_rng(seed)
    t = rng.random((n, 2)) * 50.0
    p = t + rng.normal(scale=2.0, size=t.shape)
    z = np.concatenate([p, rng.normal(size=(n, 5))], axis=1)
    return torch.from_numpy(p), torch.from_numpy(t), torch.from_numpy(z).float()


def _shards(n: int, scenario: str) -> list[list[np.ndarray]]:
    """Per rank, the list of index batches it updates with."""
    order = np.random.default_rng(1).permutation(n)
    if scenario == "uneven":
        cut = int(0.37 * n)
        ranks = [order[:cut], order[cut:]]
    elif scenario == "padded":  # strided shards padded with duplicates of the first cells
        ranks = [order[0::2], np.concatenate([order[1::2], order[:3]])]
    else:  # "empty": rank 1 sees no cell at all
        ranks = [order, order[:0]]
    return [np.array_split(r, 3) if r.size else [] for r in ranks]


def _metrics() -> list:
    """Fresh metrics: both SpatialScores tasks and LatentDistortion."""
    return [
        SpatialScores(task="impute", ref_nn_distance=REF_NN),
        SpatialScores(task="transfer"),
        LatentDistortion(),
    ]


def _run(metrics: list, batches: list[np.ndarray], data) -> list[dict[str, float]]:
    """Update every metric with the given batches and compute."""
    p, t, z = data
    for batch in batches:
        idx = torch.from_numpy(batch)
        metrics[0].update(p[idx], t[idx], idx)
        metrics[1].update(p[idx], t[idx], idx)
        metrics[2].update(z[idx], t[idx], idx)
    return [{k: float(v) for k, v in m.compute().items()} for m in metrics]


def _worker(rank: int, port: int, expected: list[dict[str, float]], scenarios: list[str]) -> None:
    """One DDP rank: checks every scenario against the single-process values."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        torch.set_num_threads(1)
        data = _data()
        for scenario in scenarios:
            got = _run(_metrics(), _shards(len(data[0]), scenario)[rank], data)
            assert got == expected, f"rank {rank}, {scenario}: {got} != {expected}"
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_equal_single_process() -> None:
    data = _data()
    n = len(data[0])
    expected = _run(_metrics(), [np.random.default_rng(2).permutation(n)], data)
    assert set(expected[0]) == {"dist_pearson", "dist_spearman", "knn10", "median_error"}
    mp.spawn(
        _worker,
        args=(_free_port(), expected, ["uneven", "padded", "empty"]),
        nprocs=WORLD,
        join=True,
    )
