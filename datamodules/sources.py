"""Rows of reference expression read from the ``.h5ad`` files on demand (the streaming path).

:class:`StoredRows` is what a streaming datamodule hands out as ``cells(split).raw``: an (n, G)
matrix-like object over one or several sections on disk whose rows (an integer array, a slice or
an int) are read when asked for, as a float32 CSR matrix of the model's genes in the model's
order. It holds only per-cell bookkeeping (which file row each cell is), never expression, and it
pickles without its open files, so every DataLoader worker and every DDP rank opens its own
read-only handles and reads only the rows its batches ask for.

Sparse ``X`` (CSR) is read with anndata's backed sparse dataset (:func:`anndata.io.sparse_dataset`,
one call per batch of sorted rows); dense ``X`` with h5py's row selection. A CSC matrix cannot be
read by rows cheaply; :func:`streamable` says so and the datamodule refuses it with the fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import scipy.sparse as sp


def _element(file: h5py.File, layer: str | None) -> Any:
    return file["X"] if layer is None else file["layers"][layer]


def encoding(path: str | Path, layer: str | None) -> str | None:
    """The on-disk encoding of ``X`` (or the layer): ``csr_matrix``, ``csc_matrix``, ``array``,
    or ``None`` when the file has no such matrix (reading it then says so)."""
    try:
        with h5py.File(path, "r") as f:
            elem = _element(f, layer)
            if isinstance(elem, h5py.Dataset):
                return "array"
            return str(elem.attrs.get("encoding-type", "unknown"))
    except (KeyError, OSError):
        return None


def streamable(path: str | Path, layer: str | None) -> bool:
    """Whether the matrix can be read row block by row block (CSR or dense)."""
    return encoding(path, layer) in ("csr_matrix", "array")


@dataclass
class Section:
    """One file's part of a reference: the usable rows and where the model's genes are.

    Attributes:
        path: the ``.h5ad`` file.
        layer: ``None`` for ``X``, else the layer's name.
        rows: (n_s,) the section's usable rows (file row ids, increasing).
        cols: (G,) the file column of each of the model's genes, in the model's order.
    """

    path: str
    layer: str | None
    rows: np.ndarray
    cols: np.ndarray
    _handle: Any = field(default=None, repr=False, compare=False)
    _matrix: Any = field(default=None, repr=False, compare=False)
    _pid: int = field(default=-1, repr=False, compare=False)
    _order: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_handle=None, _matrix=None, _pid=-1)  # each process opens its own
        return state

    def _open(self) -> Any:
        if self._matrix is None or self._pid != os.getpid():
            from dpvae.io import matrix_on_disk

            self._handle = h5py.File(self.path, "r")
            self._matrix = matrix_on_disk(_element(self._handle, self.layer))
            self._pid = os.getpid()
        return self._matrix

    def close(self) -> None:
        """Close the file handle (it is reopened when rows are next read)."""
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle = self._matrix = None

    def read(self, local: np.ndarray) -> sp.csr_matrix:
        """Rows ``local`` (positions in :attr:`rows`, increasing) of the model's genes, float32."""
        matrix = self._open()
        file_rows = self.rows[local]
        if len(file_rows) == 0:
            return sp.csr_matrix((0, len(self.cols)), dtype=np.float32)
        lo, hi = int(file_rows[0]), int(file_rows[-1]) + 1
        if hi - lo == len(file_rows):  # a contiguous block: one range read
            block = matrix[lo:hi]
        else:
            block = matrix[file_rows]
        if isinstance(block, np.ndarray):
            return sp.csr_matrix(block[:, self.cols].astype(np.float32, copy=False))
        return sp.csr_matrix(sp.csr_matrix(block)[:, self.cols], dtype=np.float32)


class StoredRows:
    """Reference cells of one or several sections, read from disk a row block at a time.

    Cell ``i`` is row ``i`` of the concatenation of the sections' usable rows, in section order.
    Indexing with an int array (any order, repeats allowed), a slice or an int returns a float32
    CSR matrix of those cells, in that order.
    """

    ndim = 2

    def __init__(self, sections: list[Section]) -> None:
        self.sections = sections
        sizes = np.array([len(s.rows) for s in sections], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.n_genes = len(sections[0].cols) if sections else 0

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.offsets[-1]), self.n_genes

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        n, g = self.shape
        return f"StoredRows({n} cells x {g} genes in {len(self.sections)} file(s), on disk)"

    def close(self) -> None:
        """Close every open file handle."""
        for section in self.sections:
            section.close()

    def __getitem__(self, key: Any) -> sp.csr_matrix:
        if isinstance(key, slice):
            idx = np.arange(*key.indices(len(self)), dtype=np.int64)
        elif np.isscalar(key):
            idx = np.array([int(key)], dtype=np.int64)  # type: ignore[arg-type]
        else:
            idx = np.asarray(key)
            if idx.dtype == bool:  # a mask over all cells, as a CSR matrix takes it
                if idx.shape != (len(self),):
                    raise IndexError(f"a boolean mask of {idx.shape} for {len(self)} cells")
                idx = np.flatnonzero(idx)
            idx = idx.astype(np.int64, copy=False)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"cell index out of range for {n} cells")
        idx = np.where(idx < 0, idx + n, idx)
        order = np.argsort(idx, kind="stable")
        wanted = idx[order]
        unique, inverse = np.unique(wanted, return_inverse=True)
        section_of = np.searchsorted(self.offsets, unique, side="right") - 1
        blocks = []
        for s in np.unique(section_of):
            local = unique[section_of == s] - self.offsets[s]
            blocks.append(self.sections[int(s)].read(local))
        if not blocks:
            return sp.csr_matrix((0, self.n_genes), dtype=np.float32)
        block = sp.vstack(blocks, format="csr") if len(blocks) > 1 else blocks[0]
        # back to the requested order (repeats included)
        position = np.empty(len(idx), dtype=np.int64)
        position[order] = inverse
        if len(unique) == len(idx) and np.array_equal(position, np.arange(len(idx))):
            return block
        return block[position]


class RowSubset:
    """Rows ``rows`` of a row-indexable matrix, read through it (no copy of its own).

    ``subset[key]`` is ``source[rows[key]]`` for an int array, a slice or an int.
    """

    ndim = 2

    def __init__(self, source: Any, rows: np.ndarray) -> None:
        self.source = source
        self.rows = np.asarray(rows, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), int(self.source.shape[1])

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"RowSubset({len(self.rows)} of {self.source!r})"

    def __getitem__(self, key: Any) -> Any:
        if np.isscalar(key):
            key = [int(key)]  # type: ignore[arg-type]
        return self.source[self.rows[key]]
