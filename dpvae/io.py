"""Reading spatial AnnData files safely, chunk by chunk.

Everything that touches a user's file goes through here so that a wrong path, a file that is not
``.h5ad``, missing or broken coordinates all give one clear :class:`~dpvae.errors.DataError` line.
Large files are opened in backed mode and their matrices are only ever read in row chunks, so a
sparse matrix is never densified whole.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import scipy.sparse as sp

from dpvae.errors import DataError
from dpvae.paths import check_exists as check_exists
from dpvae.paths import resolve_path as resolve_path
from dpvae.paths import resolve_references as resolve_references

#: Feature-name prefix of MERFISH negative-control barcodes, dropped by the input hygiene.
BLANK_PREFIX = "Blank"


def check_h5ad(path: str | Path) -> Path:
    """The file behind ``path`` (see :func:`resolve_path`), checked to exist and to be HDF5.

    Raises:
        DataError: the file does not exist, is a folder or is not HDF5.
    """
    p = check_exists(path)
    if not h5py.is_hdf5(p):
        raise DataError(
            f"{p}: not an .h5ad file (not HDF5); save your data with AnnData.write_h5ad first"
        )
    return p


def read_h5ad(
    path: str | Path, backed: bool | str = "auto", backed_threshold_mb: float = 1024.0
) -> ad.AnnData:
    """Open an ``.h5ad`` file, in backed (read-only, on-disk) mode when it is large.

    Args:
        path: a file path or the name of an embedded dataset (``osmfish``).
        backed: ``True`` or ``False`` to force a mode, ``"auto"`` to go backed above
            ``backed_threshold_mb``.
        backed_threshold_mb: file size from which ``"auto"`` opens the file backed.

    Raises:
        DataError: the file does not exist, is a folder, is not HDF5 or is not AnnData.
    """
    p = check_h5ad(path)
    if backed == "auto":
        backed = p.stat().st_size > backed_threshold_mb * 2**20
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ad.read_h5ad(p, backed="r" if backed else None)
    except Exception as exc:  # anndata raises many kinds for a malformed file
        raise DataError(
            f"{p}: could not be read as AnnData ({type(exc).__name__}: {exc}); "
            "check that it was written with AnnData.write_h5ad"
        ) from exc


class _Elements(Mapping):
    """A group of an open ``.h5ad`` file whose elements are read when asked for: ``obsm`` (each
    array read whole: one row per cell) or ``layers`` (each matrix left on disk)."""

    def __init__(self, file: h5py.File, name: str, on_disk: bool) -> None:
        self._group = file[name] if name in file else None
        self._on_disk = on_disk

    def __getitem__(self, key: str) -> Any:
        if self._group is None or key not in self._group:
            raise KeyError(key)
        elem = self._group[key]
        return matrix_on_disk(elem) if self._on_disk else _read_elem(elem)

    def __iter__(self) -> Iterator[str]:
        return iter(()) if self._group is None else iter(self._group.keys())

    def __len__(self) -> int:
        return 0 if self._group is None else len(self._group)


def _read_elem(elem: Any) -> Any:
    try:
        from anndata.io import read_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import read_elem  # type: ignore[no-redef]
    return read_elem(elem)


def matrix_on_disk(elem: Any) -> Any:
    """A matrix element left on disk: an h5py dataset (dense) or anndata's sparse dataset (the
    streaming reader's, :class:`dpvae.datamodules.sources.Section`, too)."""
    if isinstance(elem, h5py.Dataset):
        return elem
    try:
        from anndata.io import sparse_dataset
    except ImportError:  # anndata < 0.11
        from anndata.experimental import sparse_dataset  # type: ignore[no-redef]
    return sparse_dataset(elem)


class OnDisk:
    """An ``.h5ad`` file open read-only with nothing read but cell and gene names: what the
    streaming datamodule reads of an AnnData (``obs_names``, ``var_names``, ``n_obs``,
    ``obsm[key]``, ``X`` and ``layers[name]`` as matrices on disk, ``file.close()``).

    anndata's backed mode keeps ``X`` on disk but reads every layer into memory, so a reference
    whose counts are in a layer (or that carries layers it does not use) would be held whole
    while it streams; here a layer is opened on disk only when it is the one asked for.
    """

    isbacked = True

    def __init__(self, path: str | Path) -> None:
        self.filename = Path(path)
        self.file = h5py.File(path, "r")
        try:
            self.obs_names = self._index("obs")
            self.var_names = self._index("var")
        except Exception:
            self.file.close()
            raise
        self.obsm = _Elements(self.file, "obsm", on_disk=False)
        self.layers = _Elements(self.file, "layers", on_disk=True)

    def _index(self, name: str) -> Any:
        import pandas as pd

        group = self.file[name]
        column = group.attrs["_index"]
        return pd.Index(np.asarray(_read_elem(group[column])).astype(str))

    @property
    def n_obs(self) -> int:
        return len(self.obs_names)

    @property
    def X(self) -> Any:  # noqa: N802 - AnnData's name
        if "X" not in self.file:
            return None
        return matrix_on_disk(self.file["X"])


def open_on_disk(path: str | Path) -> OnDisk:
    """:class:`OnDisk` of an ``.h5ad`` file (checked as :func:`read_h5ad` checks it).

    Raises:
        DataError: the file does not exist, is a folder, is not HDF5 or is not AnnData.
    """
    p = check_h5ad(path)
    try:
        return OnDisk(p)
    except Exception as exc:  # h5py and anndata raise many kinds for a malformed file
        raise DataError(
            f"{p}: could not be read as AnnData ({type(exc).__name__}: {exc}); "
            "check that it was written with AnnData.write_h5ad"
        ) from exc


def get_coordinates(
    adata: ad.AnnData, key: str = "spatial", option: str = "data.spatial_key"
) -> np.ndarray:
    """Return the cells' coordinates ``obsm[key]`` as a float64 array of shape (n, 2 or 3).

    Raises:
        DataError: no such key, or not a 2-D/3-D numeric array with one row per cell.
    """
    if key not in adata.obsm:
        have = ", ".join(sorted(adata.obsm.keys())) or "none"
        raise DataError(
            f"no coordinates under obsm['{key}'] (obsm keys: {have}); "
            f"set {option} to the key that holds them"
        )
    coords = adata.obsm[key]
    if hasattr(coords, "to_numpy"):
        coords = coords.to_numpy()
    try:
        coords = np.asarray(coords, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"obsm['{key}'] is not numeric ({exc}); store coordinates as numbers"
        ) from exc
    if coords.ndim != 2 or coords.shape[0] != adata.n_obs or coords.shape[1] not in (2, 3):
        raise DataError(
            f"obsm['{key}'] has shape {coords.shape}; expected ({adata.n_obs}, 2) or "
            f"({adata.n_obs}, 3), one row of x, y[, z] per cell"
        )
    return coords


def get_matrix(adata: ad.AnnData, layer: str | None = None) -> Any:
    """The expression matrix to use: ``X`` or ``layers[layer]`` (possibly backed)."""
    if layer is None:
        try:
            matrix = adata.X
        except KeyError:  # a backed file written without X
            matrix = None
        if matrix is None:
            raise DataError("the file has no expression matrix X; store expression in X or a layer")
        return matrix
    if layer not in adata.layers:
        have = ", ".join(sorted(adata.layers.keys())) or "none"
        raise DataError(
            f"no layer '{layer}' (layers: {have}); set data.layer to one of them or null"
        )
    return adata.layers[layer]


def iter_row_chunks(
    matrix: Any, chunk_size: int = 10_000, rows: np.ndarray | None = None
) -> Iterator[tuple[np.ndarray, sp.csr_matrix | np.ndarray]]:
    """Yield ``(row_indices, block)`` over ``matrix`` in row chunks.

    ``block`` is a CSR matrix for sparse input and a float array for dense input; it is never larger
    than ``chunk_size`` rows, so backed and sparse matrices are never densified whole.
    ``rows`` restricts (and orders) the rows visited; it must be increasing for backed matrices.
    """
    n = matrix.shape[0]
    order = np.arange(n) if rows is None else np.asarray(rows)
    on_disk = not isinstance(matrix, np.ndarray) and not sp.issparse(matrix)
    for start in range(0, len(order), chunk_size):
        idx = order[start : start + chunk_size]
        span = int(idx[-1] - idx[0] + 1) if len(idx) else 0
        if span == len(idx):
            block = matrix[idx[0] : idx[-1] + 1]
        elif on_disk and span <= 4 * len(idx) and idx[-1] > idx[0]:
            # on disk, one range read of the span and a selection in memory beat reading
            # scattered rows one by one when the rows fill a good part of it
            block = matrix[idx[0] : idx[-1] + 1]
            block = block[idx - idx[0]]
        else:
            block = matrix[idx]
        if sp.issparse(block):
            block = sp.csr_matrix(block)
        elif hasattr(block, "to_memory"):
            block = block.to_memory()
        else:
            block = np.asarray(block)
        yield idx, block


def gene_names(var_names: Sequence[str], what: str = "the data", warn: bool = True) -> list[str]:
    """``var_names`` as strings, repeated names told apart as ``AnnData.var_names_make_unique``
    does (``A``, ``A-1``, ...; with a warning unless ``warn`` is false), so that each column is
    one gene: a name that repeats would otherwise stand for one of its columns twice and lose
    the other."""
    import pandas as pd

    names = pd.Index([str(g) for g in var_names])
    if names.is_unique:
        return list(names)
    if warn:
        from dpvae.errors import DPVAEWarning

        repeated = names[names.duplicated()].unique()
        warnings.warn(
            f"{len(names) - names.nunique()} gene names of {what} repeat (e.g. "
            f"{', '.join(map(str, repeated[:3]))}); each repeat is read as its own gene, named "
            "as AnnData.var_names_make_unique() names it (A, A-1, ...)",
            DPVAEWarning,
            stacklevel=3,
        )
    return [str(g) for g in ad.utils.make_index_unique(names)]


def blank_feature_mask(var_names: Sequence[str]) -> np.ndarray:
    """True for features to keep: everything whose name does not start with ``Blank``."""
    return np.array([not str(g).startswith(BLANK_PREFIX) for g in var_names], dtype=bool)


def check_missing_genes(missing: int, n_genes: int, what: str, allow: bool = False) -> None:
    """The rule for a model's genes absent from data: a warning, an error above half of them.

    Raises:
        DataError: more than half of the ``n_genes`` are missing and ``allow`` is false.
    """
    if missing > n_genes / 2 and not allow:
        raise DataError(
            f"{what} lacks {missing} of the model's {n_genes} genes, too many to place its cells "
            "well; check the gene ids, or pass allow_missing_genes=true to go on"
        )
    if missing:
        from dpvae.errors import DPVAEWarning

        warnings.warn(
            f"{missing} of the model's {n_genes} genes are missing from {what}; they are filled "
            "with zeros",
            DPVAEWarning,
            stacklevel=3,
        )


def align_genes(
    adata: ad.AnnData, genes: Sequence[str], layer: str | None = None, chunk_size: int = 10_000
) -> tuple[sp.csr_matrix, int]:
    """Expression of ``genes`` (in that order) for every cell, missing genes as zero columns.

    Returns the CSR matrix (float32) and the number of genes missing from ``adata``.

    Raises:
        DataError: ``adata`` shares no gene with ``genes`` or has no cells.
    """
    if adata.n_obs == 0:
        raise DataError("the query has no cells; give a file with at least one cell")
    position = {g: i for i, g in enumerate(gene_names(adata.var_names, "the query"))}
    src = np.array([position.get(str(g), -1) for g in genes])
    present = src >= 0
    if not present.any():
        raise DataError(
            f"the query shares no gene with the model's {len(genes)} genes (e.g. "
            f"{', '.join(map(str, list(genes)[:3]))}); check that both use the same gene ids"
        )
    matrix = get_matrix(adata, layer)
    dst_cols = np.flatnonzero(present)
    src_cols = src[present]
    blocks = []
    for _, block in iter_row_chunks(matrix, chunk_size):
        sub = block[:, src_cols]
        sub = sp.csr_matrix(sub, dtype=np.float32)
        # scatter into the model's gene order
        scatter = sp.csr_matrix(
            (np.ones(len(src_cols), dtype=np.float32), (np.arange(len(src_cols)), dst_cols)),
            shape=(len(src_cols), len(genes)),
        )
        blocks.append(sub @ scatter)
    out = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, len(genes)))
    return out.astype(np.float32), int((~present).sum())


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def clean_stale_temporaries(folder: Path, name: str) -> list[Path]:
    """Remove ``.NAME.PID.tmp`` files in ``folder`` left by writes whose process is gone."""
    import os

    removed = []
    for tmp in folder.glob(f".{name}.*.tmp"):
        try:
            pid = int(tmp.name[len(name) + 2 : -4])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
            continue  # still writing
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def write_atomic(path: str | Path, write: Any) -> Path:
    """Run ``write(tmp)`` on ``.NAME.PID.tmp`` beside ``path``, then rename it onto ``path``.

    The result gets the permissions the umask allows (as a plain ``open`` would), a killed
    earlier write's temporary file is cleaned up, and an existing ``path`` is only replaced once
    the new file is complete.
    """
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path.parent, path.name)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_h5ad_atomic(adata: ad.AnnData, path: str | Path) -> Path:
    """Write ``adata`` to ``path`` atomically (see :func:`write_atomic`)."""
    return write_atomic(path, lambda tmp: adata.write_h5ad(tmp))


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`write_atomic`)."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text))
