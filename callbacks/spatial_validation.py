"""Validation by the task itself: impute held-out cells' coordinates and score them."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch

from dpvae.contracts import ReferenceData
from dpvae.errors import DPVAEWarning, check_spatial_options
from dpvae.gathered_metrics import LatentDistortion, SpatialScores
from dpvae.placement import EXPRESSION_WEIGHT, NEIGHBOURS, calibrate_in_sample, place

#: the fewest validation cells of a section its distance scores are computed on
MIN_SCORED = 3


@dataclass
class _Group:
    """One section's (or the whole reference's) cells a validation places: sampled training
    cells as the reference and sampled validation cells as the query (original coordinates)."""

    key: str | None
    ref_raw: Any
    ref_rows: np.ndarray
    ref_coords: np.ndarray
    val_raw: Any
    val_rows: np.ndarray
    val_coords: np.ndarray
    val_index: np.ndarray


class SpatialValidation(L.Callback):
    """Every ``every_n_epochs`` validation epochs, place the validation cells and log ``val/`` scores.

    The validation cells are embedded and placed against the training cells by the rules
    prediction uses (:func:`dpvae.placement.place`: ``k`` neighbours in the latent space, training
    cells calibrated, joined with the expression principal components when the model has them),
    and scored against their true coordinates with the
    benchmark's metrics: ``val/dist_pearson``, ``val/dist_spearman``, ``val/knn10``,
    ``val/median_error``, plus the latent distortion (``val/distortion_max_min``,
    ``val/distortion_p95_p5``) and best-scale ``val/stress``. Under DDP every rank places its own shard of validation cells (the training
    cells are embedded on every rank with the same weights) and the torchmetrics states gather
    across ranks, ordered by cell id, so the logged values equal a single process's.

    A reference of several sections is scored section by section (each section's validation
    cells against its own training cells, in its own frame; the logged values are the averages
    weighted by validation cells), since distances between unregistered sections mean nothing.

    The datamodule must implement :class:`dpvae.contracts.ReferenceData` (its ``cells("train")``
    and ``cells("val")`` are read), as :class:`dpvae.datamodules.ReferenceDataModule` does.

    Args:
        every_n_epochs: run on every n-th validation epoch (and always on the last one); every
            epoch when a checkpoint or best-weights callback monitors one of these metrics
            (early stopping checks them on the epochs they are computed).
        k: reference neighbours per validation cell.
        max_reference: at most this many training cells (a seeded subsample) serve as reference.
        max_query: at most this many validation cells (a seeded subsample) are placed and scored.
        seed: seed of the subsamples.
        n_iter: stress-majorisation iterations of :func:`dpvae.solver.impute` on the latent
            neighbours (0, the default: the neighbours' distance-weighted mean alone).
        expression_weight: weight of the expression principal components in the neighbour search.
    """

    def __init__(
        self,
        every_n_epochs: int = 5,
        k: int = NEIGHBOURS,
        max_reference: int = 50_000,
        max_query: int = 20_000,
        seed: int = 0,
        n_iter: int = 0,
        expression_weight: float = EXPRESSION_WEIGHT,
    ) -> None:
        super().__init__()
        check_spatial_options(
            every_n_epochs=every_n_epochs,
            k=k,
            max_reference=max_reference,
            max_query=max_query,
            n_iter=n_iter,
            expression_weight=expression_weight,
        )
        self.every_n_epochs = int(every_n_epochs)
        self.k = k
        self.max_reference = max_reference
        self.seed = seed
        self.n_iter = n_iter
        self.expression_weight = expression_weight
        self.max_query = max_query
        # (scores, distortion) metrics of the whole reference (key None) or of each section
        self._groups: dict[str | None, tuple[SpatialScores, LatentDistortion]] = {}
        # the cells each validation places (the same seeded subsample every time), taken once
        self._plan: list[_Group] | None = None
        #: (epoch, scores) of the latest validation it scored (read by the Report callback)
        self.latest: tuple[int, dict[str, float]] | None = None

    METRICS = (
        "dist_pearson",
        "dist_spearman",
        "knn10",
        "median_error",
        "distortion_max_min",
        "distortion_p95_p5",
        "stress",
    )

    @staticmethod
    def placed_now(trainer: L.Trainer) -> dict[str, float] | None:
        """The scores a SpatialValidation of ``trainer`` logged this epoch, or ``None`` when none
        placed cells this epoch (what early stopping, the report and the benchmarks read)."""
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(cb, SpatialValidation) and cb.latest is not None:
                if cb.latest[0] == trainer.current_epoch:
                    return cb.latest[1]
        return None

    @property
    def validation_every(self) -> int:
        """Epochs between the validations it scores (and the last; :class:`ValidationSchedule`)."""
        return self.every_n_epochs

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # a checkpoint or best-weights monitor on one of these metrics needs them every epoch
        # (early stopping checks them on the epochs they are computed: WarmupEarlyStopping)
        from lightning.pytorch.callbacks import EarlyStopping

        watched = {
            getattr(cb, "monitor", None)
            for cb in trainer.callbacks  # type: ignore[attr-defined]
            if not isinstance(cb, EarlyStopping)
        }
        if watched & {f"val/{m}" for m in self.METRICS}:
            self.every_n_epochs = 1
        self._groups.clear()
        self._plan = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # before the first epoch: the per-cell copies ``cells()`` makes (a million cells: tens of
        # MB) are gone by the time validation's own memory peaks
        dm = trainer.datamodule  # type: ignore[attr-defined]
        if isinstance(dm, ReferenceData):
            self._plan = self._make_plan(dm)

    def _make_plan(self, dm: ReferenceData) -> list[_Group]:
        """The groups (sections) validation scores: each one's sampled reference and query cells."""
        val = dm.cells("val")
        if len(val) == 0:
            return []
        train = dm.cells("train")
        rng = np.random.default_rng(self.seed)
        groups: list[tuple[str | None, np.ndarray, np.ndarray]] = []
        if val.section is None or train.section is None:
            groups.append((None, np.arange(len(train)), np.arange(len(val))))
        else:  # sections are unrelated frames: each is placed and scored on its own
            for name in val.sections:
                groups.append(
                    (
                        name,
                        np.flatnonzero(train.section == name),
                        np.flatnonzero(val.section == name),
                    )
                )
        # distance scores need 3 cells: a section with fewer held-out cells is left out of them
        # (the counts are the whole reference's, so every DDP rank leaves out the same)
        few = [(key, len(val_rows)) for key, _, val_rows in groups if len(val_rows) < MIN_SCORED]
        if few:
            shown = ", ".join(
                f"{'the reference' if key is None else f'section {key}'} has {n}" for key, n in few
            )
            warnings.warn(
                f"validation cells: {shown}; the spatial scores (val/dist_pearson ...) need "
                f"{MIN_SCORED} or more in a section and leave it out (a larger data.val_fraction "
                "scores it)",
                DPVAEWarning,
                stacklevel=2,
            )
            groups = [g for g in groups if len(g[2]) >= MIN_SCORED]
        share = max(len(groups), 1)
        plan = []
        for key, ref_rows, val_rows in groups:
            if len(ref_rows) > self.max_reference // share:
                ref_rows = np.sort(rng.choice(ref_rows, self.max_reference // share, replace=False))
            if len(val_rows) > self.max_query // share:
                val_rows = np.sort(rng.choice(val_rows, self.max_query // share, replace=False))
            plan.append(
                _Group(
                    key=key,
                    ref_raw=train.raw,
                    ref_rows=ref_rows,
                    ref_coords=np.asarray(train.coords[ref_rows]),
                    val_raw=val.raw,
                    val_rows=val_rows,
                    val_coords=np.asarray(val.coords[val_rows]),
                    val_index=np.asarray(val.index[val_rows]),
                )
            )
        return plan

    def _due(self, trainer: L.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        last = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0 or last

    def _metrics(self, key: str | None, pre: Any) -> tuple[SpatialScores, LatentDistortion]:
        if key not in self._groups:
            # standardised coordinates: the reference's median NN distance in model units
            scores = SpatialScores(
                task="impute", ref_nn_distance=pre.ref_nn_distance / pre.coord_scale
            )
            self._groups[key] = (scores, LatentDistortion())
        return self._groups[key]

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule  # type: ignore[attr-defined]
        if not self._due(trainer) or not isinstance(dm, ReferenceData):
            return
        if self._plan is None:  # validation outside fit (trainer.validate)
            self._plan = self._make_plan(dm)
        if not self._plan:
            return
        pre = dm.preprocessor
        results = []
        for group in self._plan:
            values = self._score(trainer, pl_module, pre, group)
            results.append((len(group.val_rows), values))
        total = sum(n for n, _ in results)
        values = results[0][1]
        if len(results) > 1:
            values = {name: sum(n * v[name] for n, v in results) / total for name in values}
        scores = {f"val/{name}": float(value) for name, value in values.items()}
        add = getattr(pl_module, "add_epoch_values", None)
        if add is not None:  # dpvae's module: in the row of its validation means
            add("val", scores)
        else:
            for name, value in scores.items():
                pl_module.log(name, value, sync_dist=False, rank_zero_only=False)
        self.latest = (trainer.current_epoch, {k: float(v) for k, v in values.items()})

    def _score(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        pre: Any,
        group: _Group,
    ) -> dict[str, float]:
        """Place one section's sampled validation cells against its sampled training cells."""
        key = group.key
        scores, distortion = self._metrics(key, pre)
        device = pl_module.device
        scores.to(device)
        distortion.to(device)
        embed: Any = pl_module.embed
        ref_latent, ref_pcs = embed(group.ref_raw[group.ref_rows], with_pcs=True)
        ref_latent = torch.as_tensor(ref_latent, device=device)
        ref_coords = torch.as_tensor(
            pre.coords_to_model(group.ref_coords, key), dtype=torch.float32, device=device
        )
        n_val = len(group.val_rows)
        shard = np.array_split(np.arange(n_val), trainer.world_size)[trainer.global_rank]
        # every rank embeds all validation cells (same weights, same result): their spread
        # calibrates the training cells' codes as prediction does (calibrate_in_sample)
        val_latent, val_pcs = embed(group.val_raw[group.val_rows], with_pcs=True)
        both = torch.cat([ref_latent, torch.as_tensor(val_latent, device=device)])
        in_sample = torch.arange(len(both), device=device) < len(ref_latent)
        ref_latent = calibrate_in_sample(both, in_sample)[0][: len(ref_latent)]
        latent = torch.as_tensor(val_latent[shard], device=device)
        coords = torch.as_tensor(
            pre.coords_to_model(group.val_coords[shard], key),
            dtype=torch.float32,
            device=device,
        )
        index = torch.as_tensor(group.val_index[shard], dtype=torch.int64, device=device)
        if len(shard):
            pred = place(
                latent,
                ref_latent,
                ref_coords,
                query_pcs=None if val_pcs is None else val_pcs[shard],
                ref_pcs=ref_pcs,
                scale=pl_module.scale_value(),  # type: ignore[operator]
                k=self.k,
                n_iter=self.n_iter,
                expression_weight=self.expression_weight,
            )
            scores.update(pred.float(), coords, index)
            distortion.update(latent, coords, index)
        values = {**scores.compute(), **distortion.compute()}  # collective: every rank
        scores.reset()
        distortion.reset()
        return {k: float(v) for k, v in values.items()}
