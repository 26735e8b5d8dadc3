"""Reference spatial data: reading, hygiene, gene selection, splits and paired batches."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
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
from dpvae.errors import ConfigError, DataError, DPVAEWarning, require, require_at_least
from dpvae.io import blank_feature_mask, get_coordinates, get_matrix, read_h5ad
from dpvae.preprocess import Preprocessor, fit_preprocessor, scan_matrix

from .sampling import BatchPlan, FixedBatches, PairedBatchSampler, as_plan


class CellDataset(Dataset):
    """Raw expression rows (CSR), standardised coordinates and cell ids, fetched a batch at a time.

    ``dataset[[i, j, ...]]`` (via ``__getitems__``) returns one batch dict with ``raw`` (B, G)
    float32, ``coords`` (B, D) float32 and ``index`` (B,) int64 global cell ids.
    """

    def __init__(self, raw: sp.csr_matrix, coords: np.ndarray, index: np.ndarray) -> None:
        self.raw = raw
        self.coords = torch.as_tensor(coords, dtype=torch.float32)
        self.index = torch.as_tensor(index, dtype=torch.int64)

    def __len__(self) -> int:
        return self.raw.shape[0]

    def __getitems__(self, rows: BatchPlan | Sequence[int]) -> dict[str, torch.Tensor]:
        plan = as_plan(rows)
        rows_arr = plan.rows
        raw = torch.from_numpy(self.raw[rows_arr].toarray())
        sel = torch.from_numpy(rows_arr)
        return plan.attach({"raw": raw, "coords": self.coords[sel], "index": self.index[sel]})

    def __getitem__(self, row: int) -> dict[str, torch.Tensor]:
        batch = self.__getitems__([row])
        return {k: v[0] for k, v in batch.items()}


def _identity(batch: Any) -> Any:
    return batch


class ReferenceDataModule(L.LightningDataModule):
    """A reference spatial section as training and validation batches.

    Implements :class:`dpvae.contracts.ReferenceData` (``preprocessor`` and ``cells(split)``), the
    only parts the pipeline and the callbacks read.

    Reads an ``.h5ad`` (backed when large), applies the input hygiene (drops ``Blank*`` features and
    cells with zero total expression; cells with non-finite coordinates are an error unless
    ``drop_nonfinite``), selects the most variable genes on the reference, keeps raw values of the
    selected genes in a CSR matrix (never densified whole), standardises coordinates with one
    centre and one scale for all axes, and holds out a seeded validation fraction of cells.

    Args:
        reference: path of an ``.h5ad`` file, the name of an embedded dataset (``osmfish``), or an
            in-memory AnnData.
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
        seed: seed of the validation split and of batch order.
        min_cells: fewest usable cells accepted.
        drop_nonfinite: drop cells with NaN/infinite coordinates instead of failing.
        backed: ``auto``, ``true`` or ``false`` (see :func:`dpvae.io.read_h5ad`).
        chunk_size: rows read at a time.
        require_counts: the likelihood needs raw non-negative integer counts.
        num_workers: DataLoader workers.
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
        seed: int = 0,
        min_cells: int = 10,
        drop_nonfinite: bool = False,
        backed: str | bool = "auto",
        backed_threshold_mb: float = 1024.0,
        chunk_size: int = 2000,
        require_counts: bool = False,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        if batch_size < 2:
            raise ConfigError(f"data.batch_size must be at least 2, got {batch_size}")
        require_at_least(
            "data",
            n_genes=(n_genes, 0),
            n_pcs=(n_pcs, 0),
            neighbour_pcs=(neighbour_pcs, 0),
            n_neighbours=(n_neighbours, 1),
            min_cells=(min_cells, 3),
            chunk_size=(chunk_size, 1),
            num_workers=(num_workers, 0),
            backed_threshold_mb=(backed_threshold_mb, 0),
        )
        require(bool(spatial_key), "data.spatial_key must name an obsm key, e.g. spatial")
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
        self.seed = seed
        self.min_cells = min_cells
        self.drop_nonfinite = drop_nonfinite
        self.backed = backed
        self.backed_threshold_mb = backed_threshold_mb
        self.chunk_size = chunk_size
        self.require_counts = require_counts
        self.num_workers = num_workers
        self._ready = False
        self._preprocessor: Preprocessor | None = None

    # ------------------------------------------------------------------ setup
    def _open(self) -> ad.AnnData:
        if isinstance(self.reference, ad.AnnData):
            return self.reference
        return read_h5ad(self.reference, self.backed, self.backed_threshold_mb)

    def prepare_data(self) -> None:
        """Fail early (before any process is spawned) on a missing or unreadable file."""
        if not isinstance(self.reference, ad.AnnData):
            read_h5ad(self.reference, backed=True)

    @staticmethod
    def _flag(value: str | bool, auto: bool, name: str) -> bool:
        if value == "auto":
            return auto
        if isinstance(value, bool):
            return value
        raise ConfigError(f"data.{name} must be auto, true or false, got {value!r}")

    def setup(self, stage: str | None = None) -> None:
        """Read, clean, select genes and split (idempotent; the same on every DDP rank)."""
        if self._ready:
            return
        adata = self._open()
        coords = get_coordinates(adata, self.spatial_key)
        matrix = get_matrix(adata, self.layer)
        cell_names = np.asarray(adata.obs_names).astype(str)
        if len(set(cell_names)) < len(cell_names):
            repeated = len(cell_names) - len(set(cell_names))
            cell_names = np.asarray(ad.utils.make_index_unique(pd.Index(cell_names)))
            warnings.warn(
                f"{repeated} reference cell names are repeated; made unique with a -1, -2 ... "
                "suffix",
                DPVAEWarning,
                stacklevel=2,
            )

        finite = np.all(np.isfinite(coords), axis=1)
        if not finite.all():
            bad = int((~finite).sum())
            if not self.drop_nonfinite:
                raise DataError(
                    f"{bad} cells have non-finite coordinates in obsm['{self.spatial_key}']; "
                    "remove them or set data.drop_nonfinite=true"
                )
            warnings.warn(
                f"dropping {bad} cells with non-finite coordinates", DPVAEWarning, stacklevel=2
            )
        gene_mask = blank_feature_mask(adata.var_names)
        if not gene_mask.any():
            raise DataError("no genes left after dropping Blank* control features")
        rows = np.flatnonzero(finite)
        stats = scan_matrix(matrix, rows, gene_mask, self.chunk_size)
        totals = np.asarray(stats["totals"])
        nonzero = totals > 0
        rows, totals = rows[nonzero], totals[nonzero]
        if len(rows) < self.min_cells:
            raise DataError(
                f"only {len(rows)} usable cells (non-zero expression, finite coordinates); "
                f"dpvae needs at least {self.min_cells}"
            )
        minimum = float(stats["minimum"])
        count_data = bool(stats["is_integer"]) and minimum >= 0
        if self.require_counts:
            if minimum < 0:
                raise DataError(
                    f"the likelihood needs raw counts but the data has negative values (min "
                    f"{minimum:g}); use model.likelihood=gaussian or point data.layer at raw counts"
                )
            if not stats["is_integer"]:
                raise DataError(
                    "the likelihood needs raw integer counts but the data holds non-integer values "
                    "(normalised?); use model.likelihood=gaussian or point data.layer at raw counts"
                )
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

        n = len(rows)
        n_val = int(round(self.val_fraction * n))
        if self.val_fraction > 0 and (n_val < 2 or n - n_val < self.min_cells):
            raise DataError(
                f"{n} usable cells are too few to hold out data.val_fraction={self.val_fraction} "
                "for validation; lower it (0 disables validation) or use a larger reference"
            )
        perm = np.random.default_rng(self.seed).permutation(n)
        val_idx = np.sort(perm[:n_val])
        train_idx = np.sort(perm[n_val:])
        coords = coords[rows]
        self._preprocessor, raw = fit_preprocessor(
            matrix,
            adata.var_names,
            rows,
            train_idx,
            coords,
            gene_mask=gene_mask,
            totals=totals,
            count_data=count_data,
            normalize=normalize,
            log1p=log1p,
            n_genes=self.n_genes_requested,
            scale=self.scale,
            n_pcs=self.n_pcs,
            neighbour_pcs=self.neighbour_pcs,
            chunk_size=self.chunk_size,
        )
        std_coords = self._preprocessor.coords_to_model(coords)
        self._raw = raw
        self._coords = coords
        self._names = cell_names[rows]
        self._split = {"train": train_idx, "val": val_idx, "all": np.arange(n)}
        self.train_set = CellDataset(raw[train_idx], std_coords[train_idx], train_idx)
        self.val_set = CellDataset(raw[val_idx], std_coords[val_idx], val_idx)
        self.train_neighbours = None
        if self.neighbour_pairs:
            k = min(self.n_neighbours, len(train_idx) - 1)
            _, nbrs = cKDTree(std_coords[train_idx]).query(std_coords[train_idx], k=k + 1)
            self.train_neighbours = nbrs[:, 1:].reshape(len(train_idx), k)
        self._ready = True

    # ------------------------------------------------------ the ReferenceData contract
    @property
    def preprocessor(self) -> Preprocessor:
        """The fitted preprocessing (after :meth:`setup`)."""
        if self._preprocessor is None:
            raise RuntimeError("call setup() first")
        return self._preprocessor

    def cells(self, split: Split) -> Cells:
        """The training, validation or all usable reference cells (after :meth:`setup`)."""
        rows = self._split[split]
        raw = self._raw if split == "all" else self._raw[rows]
        return Cells(raw=raw, coords=self._coords[rows], index=rows, names=self._names[rows])

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
    def _loader(self, dataset: CellDataset, sampler: Sampler) -> DataLoader:
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=_identity,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        rank, world = self._dist()
        sampler = PairedBatchSampler(
            len(self.train_set), self.train_neighbours, self.batch_size, self.seed, rank, world
        )
        return self._loader(self.train_set, sampler)

    def val_dataloader(self) -> DataLoader | list:
        if len(self.val_set) == 0:
            return []
        rank, world = self._dist()
        shard = np.array_split(np.arange(len(self.val_set)), world)[rank]
        return self._loader(self.val_set, FixedBatches(shard, self.batch_size))
