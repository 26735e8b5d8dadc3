"""Reference spatial data: reading, hygiene, gene selection, splits and paired batches."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anndata as ad
import lightning as L
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from scipy.spatial import cKDTree
from torch.utils.data import DataLoader, Dataset, Sampler

from dpvae.contracts import Cells, Split
from dpvae.errors import ConfigError, DataError, DPVAEWarning, check_data_options
from dpvae.io import (
    blank_feature_mask,
    check_h5ad,
    check_missing_genes,
    gene_names,
    get_coordinates,
    get_matrix,
    open_on_disk,
    read_h5ad,
    resolve_references,
)
from dpvae.neighbours import release_memory
from dpvae.preprocess import (
    MatrixPart,
    Preprocessor,
    extract_rows,
    fit_frame,
    fit_preprocessor,
    scan_matrix,
)

from .sampling import BatchPlan, FixedBatches, PairedBatchSampler, as_plan
from .sources import RowSubset, Section, StoredRows, encoding


class CellDataset(Dataset):
    """Cells' raw expression, standardised coordinates and ids, fetched a batch at a time.

    ``dataset[[i, j, ...]]`` (via ``__getitems__``, with a :class:`BatchPlan` or row ids) returns
    one batch dict with ``raw`` (B, G) float32, ``coords`` (B, D) float32, ``index`` (B,) int64
    global cell ids, ``section`` (B,) int64 section codes for a reference of several sections, and
    the plan's pair set. Expression is read from ``raw`` (a CSR matrix in memory or
    :class:`~dpvae.datamodules.sources.StoredRows` on disk) only when a batch asks for it.

    Args:
        raw: (N, G) expression the dataset's cells are rows of.
        coords: (n, D) the dataset's cells' standardised coordinates.
        index: (n,) their global cell ids.
        rows: (n,) their rows in ``raw`` (default: the first ``n`` rows).
        section: (n,) their section codes, or ``None``.
        dense: ``raw`` as one dense float32 tensor, to fetch batches from (the same values; see
            :func:`dense_copy`), or ``None``.
    """

    def __init__(
        self,
        raw: Any,
        coords: np.ndarray,
        index: np.ndarray,
        rows: np.ndarray | None = None,
        section: np.ndarray | None = None,
        dense: torch.Tensor | None = None,
    ) -> None:
        self.raw = raw
        self.dense = dense
        self.coords = torch.as_tensor(coords, dtype=torch.float32)
        self.index = torch.as_tensor(index, dtype=torch.int64)
        self.rows = np.arange(len(self.index)) if rows is None else np.asarray(rows)
        self.section = None if section is None else torch.as_tensor(section, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitems__(self, rows: BatchPlan | Sequence[int]) -> dict[str, torch.Tensor]:
        plan = as_plan(rows)
        rows_arr = plan.rows
        if self.dense is not None:
            raw = self.dense.index_select(0, torch.from_numpy(self.rows[rows_arr]))
        else:
            raw = torch.from_numpy(self.raw[self.rows[rows_arr]].toarray())
        sel = torch.from_numpy(rows_arr)
        batch = {"raw": raw, "coords": self.coords[sel], "index": self.index[sel]}
        if self.section is not None:
            batch["section"] = self.section[sel]
        return plan.attach(batch)

    def __getitem__(self, row: int) -> dict[str, torch.Tensor]:
        batch = self.__getitems__([row])
        return {k: v[0] for k, v in batch.items()}


#: largest reference (dense float32 bytes) whose expression batches are fetched from a dense copy
DENSE_COPY_BYTES = 64 * 2**20


def dense_copy(raw: Any) -> torch.Tensor | None:
    """An in-memory CSR reference as a dense float32 tensor, where that is at most
    :data:`DENSE_COPY_BYTES` (a 3,600 x 2,000 section: 29 MB); else ``None``.

    A batch is then one ``index_select`` of whole rows instead of scipy's fancy row indexing and
    ``toarray``: 0.03 ms against 0.27 for 256 rows of a 250-spot array, 0.07 against 0.43 for
    256 rows of 3,600 x 2,000, about 2% of a training step there. The values are the same.
    """
    if not sp.issparse(raw) or raw.dtype != np.float32:
        return None
    if raw.shape[0] * raw.shape[1] * 4 > DENSE_COPY_BYTES:
        return None
    return torch.from_numpy(raw.toarray())


def _identity(batch: Any) -> Any:
    return batch


@dataclass
class _Opened:
    """A section while the datamodule sets up (its file handle is closed afterwards)."""

    name: str
    path: str | None
    adata: ad.AnnData
    matrix: Any
    var_names: list[str]
    rows: np.ndarray
    coords: np.ndarray
    cell_names: np.ndarray
    owned: bool = True

    def close(self) -> None:
        if self.owned and self.adata.isbacked:
            self.adata.file.close()
        self.adata = self.matrix = None  # type: ignore[assignment]


def _file_of(source: Any) -> str | None:
    """The file a reference source reads from (``None``: an in-memory AnnData)."""
    if isinstance(source, ad.AnnData):
        return str(source.filename) if source.isbacked else None
    return str(source)


def _take(values: np.ndarray | None, rows: np.ndarray) -> np.ndarray | None:
    return None if values is None else values[rows]


def _spatial_neighbours(coords: np.ndarray, section: np.ndarray, k: int) -> np.ndarray:
    """(n, k) each cell's ``k`` nearest spatial neighbours within its own section (int32 rows)."""
    counts = np.bincount(section)
    k = max(1, min(k, int(counts[counts > 0].min()) - 1))
    out = np.empty((len(coords), k), dtype=np.int32 if len(coords) < 2**31 else np.int64)
    for code in np.flatnonzero(counts):
        mine = np.flatnonzero(section == code)
        tree = cKDTree(coords[mine])
        for start in range(0, len(mine), 65_536):  # bounded (distance, index) blocks
            rows = mine[start : start + 65_536]
            _, nbrs = tree.query(coords[rows], k=k + 1)
            found = mine[nbrs.reshape(len(rows), k + 1)]
            # the cell itself is among its k + 1 nearest, but not always first: cells at one
            # position tie at distance 0 (osmFISH: 527 such repeats); drop it wherever it is
            # (or, when more than k others share its position, the last of them)
            drop = found == rows[:, None]
            drop[~drop.any(axis=1), -1] = True
            out[rows] = found[~drop].reshape(len(rows), k)
    return out


class ReferenceDataModule(L.LightningDataModule):
    """A reference of one or several spatial sections as training and validation batches.

    Implements :class:`dpvae.contracts.ReferenceData` (``preprocessor`` and ``cells(split)``), the
    only parts the pipeline and the callbacks read.

    Reads each ``.h5ad`` in row chunks, applies the input hygiene (drops ``Blank*`` features and
    cells with zero total expression; cells with non-finite coordinates are an error unless
    ``drop_nonfinite``), keeps the genes every section has, selects the most variable of them over
    all sections, standardises coordinates per section with one scale common to all, and holds
    out a seeded validation fraction of every section. Then either keeps the raw values of the
    selected genes in one CSR matrix (in memory) or nothing (streaming: every batch is read from
    the files, by the DataLoader's workers, by each DDP rank for its own shard only). Regularizer
    pairs never cross sections (their frames are unrelated): spatial neighbours are found within
    a section, and batches carry each cell's section so the model drops cross-section pairs.

    Args:
        reference: path of an ``.h5ad`` file, the name of an embedded dataset (``osmfish``), an
            in-memory AnnData, a folder of ``.h5ad`` files, a glob pattern, or a list of these
            (one section each).
        spatial_key: ``obsm`` key of the coordinates (2-D or 3-D).
        layer: take expression from this layer instead of ``X``.
        n_genes: number of most variable genes to keep (0: all).
        n_pcs: when > 0, the encoder sees this many principal components of the transformed
            expression, fitted on the training cells.
        neighbour_pcs: at most this many principal components of the log-normalised expression
            (not scaled per gene), fitted on the training cells, that prediction joins to the
            latent code to find a query cell's reference neighbours (the rule of
            :func:`dpvae.preprocess.neighbour_components`).
        normalize, log1p: ``auto``/``true``/``false``; ``auto`` normalises count data to 1e4 per
            cell and log-transforms non-negative data.
        scale: centre and scale each gene's transformed values on the reference.
        val_fraction: fraction of reference cells held out for validation (0: none).
        batch_size: cells per training batch.
        neighbour_pairs: pair each sampled cell with a random one of its ``n_neighbours`` nearest
            spatial neighbours in the batch.
        n_neighbours: size of the spatial neighbourhood that partners are drawn from.
        pair_set, far_pairs, near_weight: each training batch carries its pair set, the
            (cell, neighbour) pairs weighing ``near_weight`` of the regularizer and ``far_pairs``
            random far pairs (0: every other in-batch pair) the rest; off: every in-batch pair,
            equally weighted (see :class:`~dpvae.datamodules.PairedBatchSampler`).
        seed: seed of the validation split and of batch order.
        min_cells: fewest usable cells accepted.
        drop_nonfinite: drop cells with NaN/infinite coordinates instead of failing.
        backed: ``true`` streams batches from disk, ``false`` holds the selected genes in
            memory, ``auto`` streams when the files exceed ``backed_threshold_mb`` together or
            under DDP (both give the same batches, so the same model).
        chunk_size: rows read at a time.
        require_counts: the likelihood needs raw non-negative integer counts.
        num_workers: DataLoader worker processes; ``auto``: 1 when streaming (it reads the next
            batches while the model trains), 0 in memory.
        fixed: a trained model's preprocessing (fine-tuning): its genes (matched by name) and
            expression transforms are kept, only the coordinate frame is fitted on this data.
        allow_missing_genes: with ``fixed``, go on when more than half of its genes are missing.
    """

    def __init__(
        self,
        reference: str | Path | ad.AnnData = "osmfish",
        spatial_key: str = "spatial",
        layer: str | None = None,
        n_genes: int = 2000,
        n_pcs: int = 0,
        neighbour_pcs: int = 15,
        normalize: str | bool = "auto",
        log1p: str | bool = "auto",
        scale: bool = True,
        val_fraction: float = 0.1,
        batch_size: int = 256,
        neighbour_pairs: bool = True,
        n_neighbours: int = 8,
        pair_set: bool = False,
        far_pairs: int = 0,
        near_weight: float = 0.1,
        seed: int = 0,
        min_cells: int = 10,
        drop_nonfinite: bool = False,
        backed: str | bool = "auto",
        backed_threshold_mb: float = 1024.0,
        chunk_size: int = 2000,
        require_counts: bool = False,
        num_workers: int | str = "auto",
        fixed: Preprocessor | None = None,
        allow_missing_genes: bool = False,
    ) -> None:
        super().__init__()
        check_data_options(
            val_fraction=val_fraction,
            batch_size=batch_size,
            n_genes=n_genes,
            n_pcs=n_pcs,
            neighbour_pcs=neighbour_pcs,
            n_neighbours=n_neighbours,
            min_cells=min_cells,
            chunk_size=chunk_size,
            backed_threshold_mb=backed_threshold_mb,
            spatial_key=spatial_key,
            num_workers=num_workers,
            backed=backed,
            far_pairs=far_pairs,
            near_weight=near_weight,
        )
        self.reference = reference
        self.spatial_key = spatial_key
        self.layer = layer
        self.n_genes_requested = n_genes
        self.n_pcs = n_pcs
        self.neighbour_pcs = neighbour_pcs
        self.normalize = normalize
        self.log1p = log1p
        self.scale = scale
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self.neighbour_pairs = neighbour_pairs
        self.n_neighbours = n_neighbours
        self.pair_set, self.far_pairs, self.near_weight = pair_set, far_pairs, near_weight
        self.seed = seed
        self.min_cells = min_cells
        self.drop_nonfinite = drop_nonfinite
        self.backed = backed
        self.backed_threshold_mb = backed_threshold_mb
        self.chunk_size = chunk_size
        self.require_counts = require_counts
        self.num_workers = num_workers
        self.fixed = fixed
        self.allow_missing_genes = allow_missing_genes
        self.streaming = False
        #: lines worth telling the user about the data (sections, shared genes, streaming)
        self.notes: list[str] = []
        self._section_of: np.ndarray | None = None
        self._sections: tuple[str, ...] = ()
        self._ready = False
        self._preprocessor: Preprocessor | None = None

    # ------------------------------------------------------------------ setup
    def prepare_data(self) -> None:
        """Fail early (before any process is spawned) on a missing or unreadable file: opened
        on disk and closed (anndata's backed mode would read every layer into memory)."""
        for _, source in resolve_references(self.reference):
            if not isinstance(source, ad.AnnData):
                open_on_disk(source).file.close()

    @staticmethod
    def _flag(value: str | bool, auto: bool, name: str) -> bool:
        if value == "auto":
            return auto
        if isinstance(value, bool):
            return value
        raise ConfigError(f"data.{name} must be auto, true or false, got {value!r}")

    def _streaming(self, sources: list[tuple[str, Any]], world: int) -> bool:
        """Whether training batches are read from disk (``data.backed``; auto: large or DDP)."""
        paths = [_file_of(source) for _, source in sources]
        if self.backed is False or any(p is None for p in paths):
            if self.backed is True:
                raise ConfigError(
                    "data.backed=true streams from .h5ad files, but the reference is an in-memory "
                    "AnnData; write it with adata.write_h5ad and pass the path, or use "
                    "data.backed=auto"
                )
            return False
        layouts = {p: encoding(check_h5ad(p), self.layer) for p in paths if p is not None}
        column_major = [p for p, e in layouts.items() if e not in ("csr_matrix", "array", None)]
        if self.backed is True and column_major:
            raise DataError(
                f"{column_major[0]}: its expression matrix is stored by columns "
                f"({layouts[column_major[0]]}), which cannot be streamed by rows; rewrite it "
                "with adata.X = adata.X.tocsr(); adata.write_h5ad(...), or set data.backed=false"
            )
        if self.backed is True:
            return True
        size_mb = sum(Path(p).stat().st_size for p in layouts) / 2**20
        return not column_major and (size_mb > self.backed_threshold_mb or world > 1)

    def setup(self, stage: str | None = None) -> None:
        """Read, clean, select genes and split (idempotent; the same on every DDP rank).

        Every pass over expression reads row chunks; the in-memory path then keeps the selected
        genes of the usable cells in one CSR matrix, the streaming path keeps none (batches are
        read from the files, see :class:`~dpvae.datamodules.sources.StoredRows`).
        """
        if self._ready:
            return
        sources = resolve_references(self.reference)
        _, world = self._dist()
        streaming = self.fixed is None and self._streaming(sources, world)
        opened = [
            self._read_section(name, source, streaming, len(sources) > 1)
            for name, source in sources
        ]
        names = [s.name for s in opened]
        multi = len(opened) > 1
        dims = {s.coords.shape[1] for s in opened}
        if len(dims) > 1:
            shown = ", ".join(f"{s.name} ({s.coords.shape[1]}-D)" for s in opened)
            raise DataError(
                f"the sections have different coordinate dimensions: {shown}; give sections with "
                "the same axes"
            )
        if self.fixed is not None:
            self._setup_fixed(opened)
            return
        # candidate genes: the first section's kept genes that every section has
        kept = [
            [str(g) for g, keep in zip(s.var_names, blank_feature_mask(s.var_names)) if keep]
            for s in opened
        ]
        if not kept[0]:
            raise DataError("no genes left after dropping Blank* control features")
        common = set(kept[0]).intersection(*map(set, kept[1:]))
        genes = [g for g in kept[0] if g in common]
        if not genes:
            shown = ", ".join(f"{s.name} has {len(k)}" for s, k in zip(opened, kept))
            raise DataError(
                f"the sections share no gene ({shown}, after dropping Blank* controls); check "
                "that they use the same gene ids"
            )
        self.notes = []
        if multi:
            self.notes.append(
                f"{len(opened)} sections ({', '.join(names)}): {len(genes)} genes shared by all "
                f"(of {', '.join(str(len(k)) for k in kept)})"
            )
        parts = []
        is_integer, minimum = True, np.inf
        for s in opened:
            position = {str(g): i for i, g in enumerate(s.var_names)}
            cols = np.array([position[g] for g in genes], dtype=np.int64)
            totals, stats = self._keep_expressed(
                s, cols, f"section {s.name}" if multi else "the reference"
            )
            if len(s.rows) < self.min_cells:
                where = f"section {s.name} has" if multi else "there are"
                raise DataError(
                    f"{where} only {len(s.rows)} usable cells (non-zero expression, finite "
                    f"coordinates); dpvae needs at least {self.min_cells}"
                )
            parts.append(MatrixPart(s.matrix, s.rows, cols, totals))
            is_integer = is_integer and bool(stats["is_integer"])
            minimum = min(minimum, float(stats["minimum"]))
        count_data = is_integer and minimum >= 0
        self._check_counts(is_integer, minimum)
        normalize = self._flag(self.normalize, count_data, "normalize")
        log1p = self._flag(self.log1p, minimum >= 0, "log1p")
        if minimum < 0 and self.normalize == "auto" and self.log1p == "auto":
            warnings.warn(
                f"the expression holds negative values (min {minimum:g}): taken as already "
                "normalised, so no total-count normalisation or log1p; point data.layer at raw "
                "counts if that is wrong",
                DPVAEWarning,
                stacklevel=2,
            )

        sizes = [len(s.rows) for s in opened]
        train_idx, val_idx = self._split_cells(sizes, [s.name for s in opened])
        coords = np.concatenate([s.coords for s in opened])
        section_of = np.repeat(np.arange(len(opened)), sizes)
        self._preprocessor, selected = fit_preprocessor(
            parts,
            genes,
            train_idx,
            coords,
            count_data=count_data,
            normalize=normalize,
            log1p=log1p,
            sections=names,
            section_of=section_of,
            n_genes=self.n_genes_requested,
            scale=self.scale,
            n_pcs=self.n_pcs,
            neighbour_pcs=self.neighbour_pcs,
            chunk_size=self.chunk_size,
            seed=self.seed,
        )
        raw: Any
        if streaming:
            raw = StoredRows(
                [
                    Section(str(s.path), self.layer, s.rows, p.cols[selected])
                    for s, p in zip(opened, parts)
                ]
            )
            self.notes.append(f"streaming the reference from disk ({raw.shape[0]} cells)")
        else:
            blocks = [
                extract_rows(p.matrix, p.rows, p.cols[selected], self.chunk_size) for p in parts
            ]
            raw = blocks[0] if len(blocks) == 1 else sp.vstack(blocks, format="csr")
        for s in opened:
            s.close()
        self._finish(opened, raw, coords, section_of, train_idx, val_idx, streaming)
        release_memory()  # the files' metadata and the passes' blocks, freed but held by malloc

    def _finish(
        self,
        opened: list[_Opened],
        raw: Any,
        coords: np.ndarray,
        section_of: np.ndarray,
        train_idx: np.ndarray,
        val_idx: np.ndarray,
        streaming: bool,
    ) -> None:
        """Standardised coordinates, unique names, the datasets and the spatial neighbours."""
        assert self._preprocessor is not None
        pre = self._preprocessor
        multi = len(opened) > 1
        names = [s.name for s in opened]
        std_coords = np.empty_like(coords)
        for code, s in enumerate(opened):
            mine = section_of == code
            std_coords[mine] = pre.coords_to_model(coords[mine], s.name if multi else None)
        cell_names = np.concatenate([s.cell_names for s in opened])
        if multi and not pd.Index(cell_names).is_unique:
            cell_names = np.concatenate([np.char.add(f"{s.name}:", s.cell_names) for s in opened])
            warnings.warn(
                "cell names repeat across sections; every cell is named SECTION:NAME",
                DPVAEWarning,
                stacklevel=2,
            )
        self.streaming = streaming
        self._raw = raw
        self._coords = coords
        self._names = cell_names
        self._section_of = section_of if multi else None
        self._sections = tuple(names) if multi else ()
        self._split = {"train": train_idx, "val": val_idx}
        sec = None if not multi else section_of
        dense = dense_copy(raw)  # None for a streamed (StoredRows) or large reference
        self.train_set = CellDataset(
            raw, std_coords[train_idx], train_idx, train_idx, _take(sec, train_idx), dense
        )
        self.val_set = CellDataset(
            raw, std_coords[val_idx], val_idx, val_idx, _take(sec, val_idx), dense
        )
        self.train_neighbours = None
        if self.neighbour_pairs:
            self.train_neighbours = _spatial_neighbours(
                std_coords[train_idx], section_of[train_idx], self.n_neighbours
            )
        self._ready = True

    def _setup_fixed(self, opened: list[_Opened]) -> None:
        """Set up on a trained model's genes and expression preprocessing (fine-tuning).

        The data's genes are matched to the model's by name (missing ones are zero, with the
        rules of prediction: a warning, an error above half of them); only the coordinate frame
        is fitted anew, on these cells. Held in memory (fine-tuning data are a few cells).
        """
        assert self.fixed is not None
        genes = list(self.fixed.genes)
        multi = len(opened) > 1
        blocks, is_integer, minimum = [], True, np.inf
        for s in opened:
            where = f"section {s.name}" if multi else "the data"
            position = {g: i for i, g in enumerate(s.var_names)}
            present = np.array([i for i, g in enumerate(genes) if g in position], dtype=np.int64)
            if len(present) == 0:
                raise DataError(
                    f"{where} shares no gene with the model's {len(genes)} genes (e.g. "
                    f"{', '.join(genes[:3])}); check that both use the same gene ids"
                )
            check_missing_genes(
                len(genes) - len(present), len(genes), where, self.allow_missing_genes
            )
            cols = np.array([position[genes[i]] for i in present], dtype=np.int64)
            _, stats = self._keep_expressed(s, cols, where)
            if len(s.rows) < self.min_cells:
                raise DataError(
                    f"{where} has only {len(s.rows)} usable cells (non-zero expression over the "
                    f"model's genes, finite coordinates); at least {self.min_cells} are needed"
                )
            part = extract_rows(s.matrix, s.rows, cols, self.chunk_size).tocoo()
            blocks.append(
                sp.csr_matrix(
                    (part.data, (part.row, present[part.col])),
                    shape=(len(s.rows), len(genes)),
                    dtype=np.float32,
                )
            )
            is_integer = is_integer and bool(stats["is_integer"])
            minimum = min(minimum, float(stats["minimum"]))
        self._check_counts(is_integer, minimum)
        names = [s.name for s in opened]
        sizes = [len(s.rows) for s in opened]
        train_idx, val_idx = self._split_cells(sizes, names)
        coords = np.concatenate([s.coords for s in opened])
        section_of = np.repeat(np.arange(len(opened)), sizes)
        centers, spread, nn_distance = fit_frame(
            coords, train_idx, names if multi else (), section_of
        )
        self._preprocessor = replace(
            self.fixed,
            coord_center=centers[0].tolist(),
            coord_scale=spread,
            ref_nn_distance=nn_distance,
            sections=names if multi else [],
            section_centers=centers.tolist() if multi else [],
        )
        raw = blocks[0] if len(blocks) == 1 else sp.vstack(blocks, format="csr")
        for s in opened:
            s.close()
        self.notes.append(
            f"fine-tuning data: {len(coords)} cells on the model's {len(genes)} genes"
        )
        self._finish(opened, raw, coords, section_of, train_idx, val_idx, False)

    def _read_section(self, name: str, source: Any, streaming: bool, multi: bool) -> _Opened:
        """One section's metadata, usable rows (finite coordinates) and matrix handle."""
        try:
            if isinstance(source, ad.AnnData):
                adata = source
            elif streaming:  # names and coordinates read, the matrix left on disk
                adata = open_on_disk(source)
            else:
                adata = read_h5ad(source, self.backed, self.backed_threshold_mb)
            coords = get_coordinates(adata, self.spatial_key)
            matrix = get_matrix(adata, self.layer)
        except DataError as exc:
            if not multi:
                raise
            raise DataError(f"section {name}: {exc}") from exc
        cell_names = np.asarray(adata.obs_names).astype(str)
        if not adata.obs_names.is_unique:
            repeated = len(cell_names) - adata.obs_names.nunique()
            cell_names = np.asarray(ad.utils.make_index_unique(pd.Index(cell_names))).astype(str)
            warnings.warn(
                f"{repeated} reference cell names are repeated{f' in {name}' if multi else ''}; "
                "made unique with a -1, -2 ... suffix",
                DPVAEWarning,
                stacklevel=3,
            )
        finite = np.all(np.isfinite(coords), axis=1)
        if not finite.all():
            bad = int((~finite).sum())
            where = f" of {name}" if multi else ""
            if not self.drop_nonfinite:
                raise DataError(
                    f"{bad} cells{where} have non-finite coordinates in "
                    f"obsm['{self.spatial_key}']; remove them or set data.drop_nonfinite=true"
                )
            warnings.warn(
                f"dropping {bad} cells{where} with non-finite coordinates",
                DPVAEWarning,
                stacklevel=3,
            )
        rows = np.flatnonzero(finite)
        return _Opened(
            name=name,
            path=_file_of(source),
            adata=adata,
            matrix=matrix,
            var_names=gene_names(adata.var_names, f"section {name}" if multi else "the reference"),
            rows=rows,
            coords=coords[rows],
            cell_names=cell_names[rows],
            owned=not isinstance(source, ad.AnnData),
        )

    def _keep_expressed(
        self, s: _Opened, cols: np.ndarray, where: str
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """One pass over ``s``'s usable rows and the file columns ``cols``: drop the cells with
        no expression there (in place, with a note naming ``where`` and how many); returns the
        kept cells' totals and the pass's statistics (:func:`dpvae.preprocess.scan_matrix`)."""
        mask = np.zeros(len(s.var_names), dtype=bool)
        mask[cols] = True
        stats = scan_matrix(s.matrix, s.rows, mask, self.chunk_size)
        totals = np.asarray(stats["totals"])
        nonzero = totals > 0
        if not nonzero.all():
            self.notes.append(
                f"{where}: {int((~nonzero).sum())} of {len(nonzero)} cells left out (no "
                f"expression of the {len(cols)} genes)"
            )
        s.rows, s.coords, s.cell_names = s.rows[nonzero], s.coords[nonzero], s.cell_names[nonzero]
        return totals[nonzero], stats

    def _check_counts(self, is_integer: bool, minimum: float) -> None:
        if not self.require_counts:
            return
        if minimum < 0:
            raise DataError(
                f"the likelihood needs raw counts but the data has negative values (min "
                f"{minimum:g}); use model.likelihood=gaussian or point data.layer at raw counts"
            )
        if not is_integer:
            raise DataError(
                "the likelihood needs raw integer counts but the data holds non-integer values "
                "(normalised?); use model.likelihood=gaussian or point data.layer at raw counts"
            )

    def _split_cells(
        self, sizes: list[int], names: list[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Seeded validation cells, a ``val_fraction`` of every section (training: the rest).

        Raises:
            DataError: fewer than 2 validation cells in all (with ``val_fraction`` > 0), or a
                section with fewer than 2 training cells (a cell's spatial neighbour is another
                training cell of its section).
        """
        n = sum(sizes)
        n_val = int(round(self.val_fraction * n))
        too_few = (
            f"{n} usable cells are too few to hold out data.val_fraction={self.val_fraction} "
            "for validation; lower it (0 disables validation) or use a larger reference"
        )
        if self.val_fraction > 0 and (n_val < 2 or n - n_val < self.min_cells):
            raise DataError(too_few)
        if len(sizes) == 1:
            perm = np.random.default_rng(self.seed).permutation(n)
            return np.sort(perm[n_val:]), np.sort(perm[:n_val])
        train, val = [], []
        start = 0
        for code, size in enumerate(sizes):
            perm = start + np.random.default_rng([self.seed, code]).permutation(size)
            k = int(round(self.val_fraction * size))
            if size - k < 2:
                name = names[code] if names is not None else str(code)
                raise DataError(
                    f"section {name} keeps {size - k} of its {size} usable cells for training; "
                    "each section needs 2 or more: lower data.val_fraction or leave the section out"
                )
            val.append(perm[:k])
            train.append(perm[k:])
            start += size
        if self.val_fraction > 0 and sum(len(v) for v in val) < 2:
            raise DataError(too_few)  # each section rounds its own share, possibly to none
        return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))

    # ------------------------------------------------------ the ReferenceData contract
    @property
    def preprocessor(self) -> Preprocessor:
        """The fitted preprocessing (after :meth:`setup`)."""
        if self._preprocessor is None:
            raise RuntimeError("call setup() first")
        return self._preprocessor

    def cells(self, split: Split) -> Cells:
        """The training, validation or all usable reference cells (after :meth:`setup`).

        ``raw`` reads the cells' expression when sliced (from memory or from disk) and holds no
        copy of its own.
        """
        rows: slice | np.ndarray
        if split == "all":  # a slice: views, no copies
            rows, index, raw = slice(None), np.arange(len(self._coords)), self._raw
        else:
            rows = index = self._split[split]
            raw = RowSubset(self._raw, rows)
        section = None
        if self._section_of is not None:
            section = np.asarray(self._sections, dtype=object)[self._section_of[rows]]
        return Cells(
            raw=raw,
            coords=self._coords[rows],
            index=index,
            names=self._names[rows],
            section=section,
            sections=self._sections,
        )

    @property
    def n_genes(self) -> int:
        """Number of genes the model sees."""
        return len(self.preprocessor.genes)

    def _dist(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    # ----------------------------------------------------------- dataloaders
    def _workers(self) -> int:
        if self.num_workers == "auto":
            return 1 if self.streaming else 0
        return int(self.num_workers)

    def _loader(
        self, dataset: CellDataset, sampler: Sampler, workers: int | None = None
    ) -> DataLoader:
        workers = self._workers() if workers is None else workers
        # workers are not persistent: a fresh iterator every epoch draws the loader's seed from the
        # global generator exactly as the in-process loader does, so the model's random stream
        # (dropout, sampling) and the trained model are the same with any number of workers
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=_identity,
            num_workers=workers,
            persistent_workers=False,
            prefetch_factor=4 if workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        rank, world = self._dist()
        sampler = PairedBatchSampler(
            len(self.train_set),
            self.train_neighbours,
            self.batch_size,
            self.seed,
            rank,
            world,
            pair_set=self.pair_set,
            far_pairs=self.far_pairs,
            near_weight=self.near_weight,
        )
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            # the epoch the loader's first iterator serves: a resumed run builds that iterator
            # (and loader workers draw its first batches) before Lightning sets the epoch, so
            # it would serve epoch 0's order and partners again
            sampler.set_epoch(int(trainer.fit_loop.epoch_progress.current.processed))
        return self._loader(self.train_set, sampler)

    def val_dataloader(self) -> DataLoader | list:
        if len(self.val_set) == 0:
            return []
        rank, world = self._dist()
        shard = np.array_split(np.arange(len(self.val_set)), world)[rank]
        # in this process: validation is a tenth of the cells, and a worker of its own would sit
        # beside the training loader's (each a fork holding its own copy-on-write pages)
        return self._loader(self.val_set, FixedBatches(shard, self.batch_size), workers=0)
