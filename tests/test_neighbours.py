"""dpvae.neighbours: the exact search equals brute force (ties included), the approximate index's
recall on clustered codes, the fallback without faiss, and the memory release."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpvae import neighbours as N
from dpvae.errors import DPVAEWarning
from dpvae.neighbours import NeighbourIndex


def _brute(query: torch.Tensor, ref: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest by (float64 distance from the difference, reference row), row by row."""
    idx = np.empty((len(query), k), dtype=np.int64)
    dist = np.empty((len(query), k))
    every = torch.arange(len(ref))[None, :]
    for r in range(len(query)):
        d = N.exact_distances(query[r : r + 1], ref, every)[0].numpy()
        order = np.lexsort((np.arange(len(ref)), d))[:k]
        idx[r], dist[r] = order, d[order]
    return idx, dist


def _ties(seed: int, n_ref: int = 2500, n_query: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """Points on a small integer grid: many references at exactly the same distance."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.randint(0, 4, (n_ref, 6), generator=g).double()
    query = torch.randint(0, 4, (n_query, 6), generator=g).double()
    return ref, query


def _clustered(n: int, seed: int) -> torch.Tensor:
    """Codes like dpvae's joint space: a 2-D tissue mapped smoothly into 16 latent dimensions
    with noise, beside 15 expression dimensions clustered by cell type."""
    rng = np.random.default_rng(seed)
    fixed = np.random.default_rng(99)
    xy = rng.uniform(0, 1, (n, 2))
    z = np.sin(xy @ fixed.normal(0, 3.0, (2, 16)) + fixed.uniform(0, 6.3, 16))
    z += 0.15 * rng.normal(size=(n, 16))
    kind = (np.floor(xy[:, 0] * 4) * 5 + np.floor(xy[:, 1] * 5)).astype(int) % 20
    e = fixed.normal(0, 1.0, (20, 15))[kind] + 0.35 * rng.normal(size=(n, 15))
    return torch.from_numpy(np.hstack([z, 1.25 * e]))


@pytest.mark.parametrize("k", [1, 8, 30])
def test_exact_search_equals_brute_force_with_ties(k: int) -> None:
    ref, query = _ties(k)
    index = NeighbourIndex(ref)
    assert index.method == "exact"
    idx, dist = index.search(query, k)
    want_idx, want_dist = _brute(query, ref, k)
    np.testing.assert_array_equal(idx.numpy(), want_idx)
    np.testing.assert_array_equal(dist.numpy(), want_dist)
    # the same answer whatever the query chunk
    parts = [index.search(query[s : s + 37], k)[0] for s in range(0, len(query), 37)]
    assert torch.equal(torch.cat(parts), idx)


def test_exact_search_certifies_near_ties_beyond_the_candidates() -> None:
    """Hundreds of references at almost the same distance (closer than float32 resolves):
    the certification widens the candidates until the float64 order is settled."""
    g = torch.Generator().manual_seed(3)
    ref = 100.0 + 1e-7 * torch.randn(600, 4, generator=g, dtype=torch.float64)
    ref[:5] = torch.randn(5, 4, generator=g, dtype=torch.float64)
    query = 100.0 + 1e-7 * torch.randn(20, 4, generator=g, dtype=torch.float64)
    idx, dist = NeighbourIndex(ref).search(query, 8)
    want_idx, want_dist = _brute(query, ref, 8)
    np.testing.assert_array_equal(idx.numpy(), want_idx)
    np.testing.assert_array_equal(dist.numpy(), want_dist)


def test_exact_search_matches_the_previous_brute_force_ranking() -> None:
    """On continuous data the neighbours are those of float64 cdist + topk, nearest first."""
    g = torch.Generator().manual_seed(4)
    ref = torch.randn(3000, 31, generator=g, dtype=torch.float64)
    query = torch.randn(400, 31, generator=g, dtype=torch.float64)
    idx, _ = NeighbourIndex(ref).search(query, 8)
    old = torch.cdist(query, ref).topk(8, dim=1, largest=False, sorted=True).indices
    assert torch.equal(idx, old)


@pytest.mark.skipif(not N.faiss_available(), reason="faiss-cpu is not installed")
def test_approximate_index_recall_on_clustered_codes() -> None:
    ref, query = _clustered(40_000, 1), _clustered(2000, 2)
    exact_idx, exact_dist = NeighbourIndex(ref, exact=True).search(query, 8)
    index = NeighbourIndex(ref, exact=False)
    assert index.method == "ivf"
    idx, dist = index.search(query, 8)
    recall = (idx[:, :, None] == exact_idx[:, None, :]).any(2).double().mean()
    assert float(recall) >= 0.99
    # distances are exact for the rows found, nearest first; a miss is only ever farther
    np.testing.assert_array_equal(dist.numpy(), N.exact_distances(query, ref, idx).numpy())
    assert bool((dist[:, 1:] >= dist[:, :-1]).all())
    assert bool((dist >= exact_dist).all())
    # deterministic: a second index over the same cells answers the same
    assert torch.equal(NeighbourIndex(ref, exact=False).search(query, 8)[0], idx)


def test_without_faiss_one_warning_and_the_same_exact_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ref, query = _ties(7)
    with_faiss = NeighbourIndex(ref).search(query, 8)
    monkeypatch.setattr(N, "_faiss", lambda: None)
    monkeypatch.setattr(N, "_warned", False)
    monkeypatch.setattr(N, "TILE_REFERENCES", 512)  # several reference tiles
    with pytest.warns(DPVAEWarning, match="faiss is not installed") as caught:
        index = NeighbourIndex(ref)
        NeighbourIndex(ref, exact=False)  # the approximate request falls back to exact
    assert len(caught) == 1
    assert index.method == "exact"
    idx, dist = index.search(query, 8)
    assert torch.equal(idx, with_faiss[0]) and torch.equal(dist, with_faiss[1])


def test_search_checks_its_arguments() -> None:
    index = NeighbourIndex(torch.zeros(5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="between 1 and"):
        index.search(torch.zeros(2, 3), 6)
    with pytest.raises(ValueError, match="query must be"):
        index.search(torch.zeros(2, 4), 2)
    idx, dist = index.search(torch.zeros(0, 3), 2)
    assert idx.shape == (0, 2) and dist.shape == (0, 2)


def test_release_memory_is_safe_to_call() -> None:
    N.release_memory()
    N.release_memory()
