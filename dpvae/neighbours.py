"""Nearest reference cells of query cells: the one owner of neighbour search.

Placement (:func:`dpvae.placement.place`) and the solvers (:func:`dpvae.solver.knn_mean`,
:func:`dpvae.solver.impute`, the landmark step of :func:`dpvae.solver.reconstruct`) find each
query cell's ``k`` nearest reference cells through :class:`NeighbourIndex`. The search space is
small (a latent code beside a few expression principal components: 16 to 31 dimensions) and the
reference may hold millions of cells, so the search is

- **exact** up to :data:`EXACT_MAX_REFERENCE` reference cells: candidates from a float32
  matrix-product search (faiss ``IndexFlatL2``, or bounded torch tiles without faiss), then every
  row *certified*: its ``k`` best candidates by exact float64 distance are provably the ``k``
  nearest of the whole reference (a float32 error bound separates them from every other cell),
  otherwise the row is searched again with more candidates, up to the whole reference. The result
  is a function of the data alone: the ``k`` smallest exact distances, ties broken by the lower
  reference row, whatever the kernel, the thread count or the query chunk;
- **approximate** above it: a faiss inverted-file index (``IndexIVFFlat``: k-means cells, each
  query scanning the :data:`IVF_NPROBE` nearest), whose candidates are re-ranked by exact float64
  distance in the same order. Recall of the 8 nearest neighbours on clustered synthetic codes is
  0.99 or more (``tests/test_neighbours.py``; BENCHMARKS.md has the measurements).

Distances returned are exact float64 Euclidean distances, ``||q - r||`` computed from the
difference (as placement's weights need them). Memory is bounded by the query chunk (callers pass
query rows in chunks; :meth:`NeighbourIndex.search` bounds its own tiles) plus the reference
(float64 and float32 copies, ~12 bytes per cell and dimension, and the faiss index).

Without ``faiss`` (``pip install faiss-cpu``) the exact search runs in torch, for any reference
size, after one :class:`~dpvae.errors.DPVAEWarning` that says so.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dpvae.errors import DPVAEWarning

__all__ = [
    "EXACT_MAX_REFERENCE",
    "IVF_NPROBE",
    "NeighbourIndex",
    "faiss_available",
    "release_memory",
]

#: Reference sizes up to which the search is exact (certified): every dev dataset's reference
#: (a few thousand cells) is searched exactly, and a million queries against 20k reference cells
#: still take ~4 min on 2 cores (exact 260 us/query there, the inverted-file index ~90; at 50k
#: the exact search costs 970 us/query, 8x the index; BENCHMARKS.md).
EXACT_MAX_REFERENCE = 20_000
#: Inverted lists scanned per query by the approximate index: recall of the 8 nearest on
#: clustered synthetic codes 0.995 at 1M reference cells (4000 lists), 1.000 at 50k and 100k
#: (BENCHMARKS.md).
IVF_NPROBE = 48
#: Extra candidates beyond ``k`` fetched before the exact float64 re-ranking.
CANDIDATE_MARGIN = 16
#: Query rows and reference columns of one torch tile (float32: 4096 x 16384 x 4 B = 256 MiB).
TILE_QUERIES = 4096
TILE_REFERENCES = 16_384
#: Seed of the k-means training sample and of faiss's k-means.
SEED = 1234

_warned = False


def faiss_available() -> bool:
    """Whether ``faiss`` imports (``pip install faiss-cpu``)."""
    return _faiss() is not None


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _warn_no_faiss(n: int) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    what = "exact brute force" if n > EXACT_MAX_REFERENCE else "torch tiles"
    warnings.warn(
        f"faiss is not installed: the neighbour search over {n} reference cells runs as {what} "
        "(slow for large references); pip install faiss-cpu for the indexed search",
        DPVAEWarning,
        stacklevel=3,
    )


def release_memory() -> None:
    """Return freed heap memory to the operating system (glibc ``malloc_trim(0)``).

    glibc keeps freed blocks of up to 32 MiB (the dense expression blocks of an embedding) in the
    process heap; over a million cells that grew RSS by gigabytes that were free but held. A no-op
    where the C library is not glibc.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


_TRIM: Any = False


def _malloc_trim() -> Any:
    global _TRIM
    if _TRIM is False:
        _TRIM = None
        try:
            import ctypes
            import ctypes.util

            name = ctypes.util.find_library("c")
            if name:
                libc = ctypes.CDLL(name)
                _TRIM = getattr(libc, "malloc_trim", None)
        except (OSError, AttributeError):
            _TRIM = None
    return _TRIM


def exact_distances(query: Tensor, reference: Tensor, idx: Tensor) -> Tensor:
    """``||query_i - reference_idx[i, j]||`` in float64, from the difference (c, k)."""
    diff = query.to(torch.float64)[:, None, :] - reference[idx].to(torch.float64)
    return torch.linalg.vector_norm(diff, dim=-1)


def _order(idx: Tensor, dist: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` best of each row by (distance, reference row), sorted that way."""
    by_row = torch.argsort(idx, dim=1)
    idx, dist = idx.gather(1, by_row), dist.gather(1, by_row)
    dist, by_dist = torch.sort(dist, dim=1, stable=True)
    return idx.gather(1, by_dist)[:, :k], dist[:, :k]


class NeighbourIndex:
    """An index over reference rows answering k-nearest-neighbour queries.

    Args:
        reference: (n, d) reference points (any floating dtype; searched in float64 distances).
        exact: ``True`` for the certified exact search, ``False`` for the inverted-file index,
            ``None`` (default) for exact up to :data:`EXACT_MAX_REFERENCE` rows.
        nprobe: inverted lists scanned per query (approximate search).
        nlist: inverted lists (default ``4 * sqrt(n)``, at least 16).

    Attributes:
        method: ``"exact"`` (faiss flat or torch tiles) or ``"ivf"``.
    """

    def __init__(
        self,
        reference: Tensor,
        *,
        exact: bool | None = None,
        nprobe: int = IVF_NPROBE,
        nlist: int | None = None,
    ) -> None:
        if reference.ndim != 2:
            raise ValueError(f"reference must be 2-D, got shape {tuple(reference.shape)}")
        self.reference = reference.to(torch.float64)
        self.n, self.d = (int(s) for s in self.reference.shape)
        self.device = reference.device
        # the float32 search runs on centred points: smaller norms, smaller rounding errors
        self.center = self.reference.mean(dim=0) if self.n else self.reference.new_zeros(self.d)
        # zero columns up to a multiple of 8: the same distances, faster SIMD kernels (-20% time)
        self._pad = (-self.d) % 8
        self._ref32 = self._float32(self.reference)
        self._norm2_max = float(self._ref32.double().square().sum(1).max()) if self.n else 0.0
        want_exact = self.n <= EXACT_MAX_REFERENCE if exact is None else bool(exact)
        faiss = _faiss()
        if faiss is None:
            _warn_no_faiss(self.n)
        self._faiss = faiss
        self._index: Any = None
        self.method = "exact"
        if faiss is not None and self.n:
            host = np.ascontiguousarray(self._ref32.cpu().numpy())
            if want_exact or self.n < 64:
                self._index = faiss.IndexFlatL2(self.d + self._pad)
            else:
                self._index = self._ivf(faiss, host, nprobe, nlist)
                self.method = "ivf"
            self._index.add(host)
            del host
            release_memory()

    def _ivf(self, faiss: Any, host: np.ndarray, nprobe: int, nlist: int | None) -> Any:
        n_lists = int(nlist or max(16, round(4 * math.sqrt(self.n))))
        n_lists = max(1, min(n_lists, self.n // 39))
        width = self.d + self._pad
        quantizer = faiss.IndexFlatL2(width)
        index = faiss.IndexIVFFlat(quantizer, width, n_lists, faiss.METRIC_L2)
        self._quantizer = quantizer  # the index does not own it: keep it alive
        index.cp.seed = SEED
        index.cp.niter = 20
        # 64 training points per list (faiss's own cap is 256): a seeded sample, in row order
        n_train = min(self.n, 64 * n_lists)
        rows = np.sort(np.random.default_rng(SEED).choice(self.n, n_train, replace=False))
        index.train(np.ascontiguousarray(host[rows]))
        index.nprobe = int(min(nprobe, n_lists))
        return index

    def __len__(self) -> int:
        return self.n

    def _float32(self, x: Tensor) -> Tensor:
        """Centred float32 rows, padded with zero columns (the float32 search's input)."""
        out = torch.zeros(x.shape[0], self.d + self._pad, dtype=torch.float32, device=x.device)
        out[:, : self.d] = x - self.center
        return out

    # ------------------------------------------------------------------ search
    def search(self, query: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` nearest reference rows of each query row, nearest first.

        Returns:
            (indices (m, k) int64, exact float64 distances (m, k)), on the reference's device;
            ties are broken by the lower reference row.
        """
        if query.ndim != 2 or query.shape[1] != self.d:
            raise ValueError(f"query must be (m, {self.d}), got shape {tuple(query.shape)}")
        k = int(k)
        if not 1 <= k <= self.n:
            raise ValueError(f"k ({k}) must be between 1 and the reference size ({self.n})")
        query = query.to(device=self.device, dtype=torch.float64)
        m = query.shape[0]
        out_idx = torch.empty(m, k, dtype=torch.int64, device=self.device)
        out_dist = torch.empty(m, k, dtype=torch.float64, device=self.device)
        for start in range(0, m, TILE_QUERIES):
            q = query[start : start + TILE_QUERIES]
            idx, dist = self._search_block(q, k)
            out_idx[start : start + len(q)] = idx
            out_dist[start : start + len(q)] = dist
        return out_idx, out_dist

    def _search_block(self, q: Tensor, k: int) -> tuple[Tensor, Tensor]:
        q32 = self._float32(q)
        kk = min(self.n, k + CANDIDATE_MARGIN)
        cand, approx = self._candidates(q32, kk)
        idx, dist = _order(cand, exact_distances(q, self.reference, cand), k)
        if self.method != "exact" or kk == self.n:
            return idx, dist
        # certify: every cell outside the candidates is at least approx[:, -1] - delta (squared)
        todo = self._uncertified(q32, approx[:, -1], dist[:, -1])
        while todo.numel() and kk < self.n:
            kk = min(self.n, 4 * kk)
            failed = []
            for part in torch.split(todo, max(1, (1 << 22) // kk)):
                c, a = self._candidates(q32[part], kk)
                i, t = _order(c, exact_distances(q[part], self.reference, c), k)
                idx[part], dist[part] = i, t
                if kk < self.n:
                    failed.append(part[self._uncertified(q32[part], a[:, -1], t[:, -1])])
            todo = torch.cat(failed) if failed else todo[:0]
        return idx, dist

    def _uncertified(self, q32: Tensor, last_approx: Tensor, kth: Tensor) -> Tensor:
        """Rows whose k-th exact distance is not provably below every non-candidate's."""
        q_norm2 = q32.double().square().sum(1)
        # float32 squared distances err by at most ~(2d + 8) u (|q|^2 + |r|^2), u = 2^-24
        delta = (2 * self.d + 8) * 2.0**-24 * (q_norm2 + self._norm2_max)
        bound = last_approx.to(torch.float64) - delta
        return (kth.square() >= bound).nonzero().squeeze(1)

    def _candidates(self, q32: Tensor, kk: int) -> tuple[Tensor, Tensor]:
        """(candidate rows (c, kk), their approximate squared distances) from the float32 search."""
        if self._index is not None:
            dist, idx = self._index.search(np.ascontiguousarray(q32.cpu().numpy()), kk)
            idx_t = torch.from_numpy(idx).to(self.device)
            dist_t = torch.from_numpy(dist).to(self.device)
            if bool((idx_t < 0).any()):  # the IVF lists scanned held fewer than kk cells
                missing = idx_t < 0
                idx_t = torch.where(missing, torch.zeros_like(idx_t), idx_t)
                dist_t = torch.where(missing, torch.full_like(dist_t, torch.inf), dist_t)
                idx_t = self._fill_missing(idx_t, missing)
            return idx_t, dist_t
        return self._torch_candidates(q32, kk)

    def _fill_missing(self, idx: Tensor, missing: Tensor) -> Tensor:
        """Pad rows with unused reference rows where the IVF lists ran short (distinct per row)."""
        for r in missing.any(dim=1).nonzero().squeeze(1).tolist():
            have = set(idx[r][~missing[r]].tolist())
            fill = [i for i in range(self.n) if i not in have][: int(missing[r].sum())]
            idx[r][missing[r]] = torch.tensor(fill, dtype=idx.dtype, device=idx.device)
        return idx

    def _torch_candidates(self, q32: Tensor, kk: int) -> tuple[Tensor, Tensor]:
        """Tiled float32 ``|q|^2 + |r|^2 - 2 q.r`` with a running top-``kk`` (bounded memory)."""
        qn = q32.square().sum(1, keepdim=True)
        best_d = best_i = None
        for start in range(0, self.n, TILE_REFERENCES):
            r = self._ref32[start : start + TILE_REFERENCES]
            d2 = torch.addmm(qn + r.square().sum(1)[None, :], q32, r.T, alpha=-2.0)
            take = min(kk, d2.shape[1])
            d_t, i_t = d2.topk(take, dim=1, largest=False, sorted=False)
            i_t = i_t + start
            if best_d is None or best_i is None:
                best_d, best_i = d_t, i_t
            else:
                d_t, i_t = torch.cat([best_d, d_t], 1), torch.cat([best_i, i_t], 1)
                keep = min(kk, d_t.shape[1])
                best_d, pos = d_t.topk(keep, dim=1, largest=False, sorted=False)
                best_i = i_t.gather(1, pos)
            del d2
        assert best_d is not None and best_i is not None
        best_d, pos = torch.sort(best_d, dim=1)
        return best_i.gather(1, pos), best_d
