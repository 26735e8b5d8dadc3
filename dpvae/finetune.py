"""Cross-validation over the cells a model is fine-tuned on (``init_from``).

Fine-tuning on a few anchor cells can help or hurt: on 13 breast anchors 40 epochs lost 0.02
dist_pearson against the model as it was, 10 epochs gained; on 180 DLPFC anchors 40 epochs gained
0.02. And once fine-tuned, every anchor is a training cell, so anchors placed against each other
are placed better than a query is: a radius calibrated on them held only half the query cells.

:func:`cross_validate` answers both from the anchors alone. The cells are dealt into ``folds``;
for each, the same schedule fine-tunes the starting model on the other folds, and at epochs 0,
``every_n_epochs``, ... ``trainer.max_epochs`` the held-out fold is placed against the fit's own
training cells, exactly as prediction will place a query against the anchors. The epoch with the
lowest mean error over all held-out cells is the schedule of the final fit (0: the starting model
is kept), and the held-out cells' scores at that epoch calibrate the 90% radius
(:func:`dpvae.placement.radius_record`; cells no fit of theirs saw).

Written here rather than with a library's cross-validation (scikit-learn's ``KFold`` deals folds,
but the fits are Lightning runs probed mid-training, and the deal is one line of numpy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from dpvae.network import Parts
    from dpvae.placement import ReferenceEmbedding

#: the fewest training cells of a fold fit (the datamodule's own floor is 3)
MIN_FOLD_CELLS = 3


@dataclass
class CrossValidation:
    """What :func:`cross_validate` found.

    Attributes:
        epochs: the fine-tuning schedule chosen (0: the starting model as it is).
        errors: mean placement error of the held-out cells by epoch, in the fine-tuning cells'
            median nearest-neighbour spacings.
        calibration: the radius record (:func:`dpvae.placement.radius_record`) at ``epochs``.
        folds: the number of folds fitted.
        route: how the query is placed: ``"anchors"`` (against the fine-tuned model's anchors)
            or ``"through"`` (by the starting model through its reference cells, carried into
            the anchors' frame: :mod:`dpvae.anchors`; the final fit then keeps the starting
            model).
        scores: dist_pearson of the held-out cells' placements pooled over the folds, by route
            (``"through"`` only when the starting model's reference cells were given).
    """

    epochs: int
    errors: dict[int, float] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    folds: int = 0
    route: str = "anchors"
    scores: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for the run's notes."""
        table = ", ".join(f"{e}: {v:.2f}" for e, v in sorted(self.errors.items()))
        line = (
            f"fine-tuning cross-validation ({self.folds} folds): held-out cells' mean error "
            f"(cell spacings) by epoch {table} -> {self.epochs} epochs"
        )
        if "through" in self.scores:
            line += (
                f"; held-out dist_pearson against the anchors {self.scores['anchors']:.3f}, "
                f"through the starting model's reference {self.scores['through']:.3f} -> "
                + (
                    "placed through its reference (the starting model kept)"
                    if self.route == "through"
                    else "placed against the anchors"
                )
            )
        return line

    def to_record(self) -> dict[str, Any]:
        """Plain data for the run's record in each checkpoint."""
        return {
            "epochs": int(self.epochs),
            "errors": {str(k): float(v) for k, v in self.errors.items()},
            "calibration": self.calibration,
            "folds": int(self.folds),
            "route": self.route,
            "scores": {str(k): float(v) for k, v in self.scores.items()},
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> CrossValidation:
        """Inverse of :meth:`to_record`."""
        return cls(
            epochs=int(record["epochs"]),
            errors={int(k): float(v) for k, v in dict(record.get("errors") or {}).items()},
            calibration=record.get("calibration"),
            folds=int(record.get("folds", 0)),
            route=str(record.get("route", "anchors")),
            scores={str(k): float(v) for k, v in dict(record.get("scores") or {}).items()},
        )


def folds_of(cfg: DictConfig) -> int:
    """``cfg.finetune.folds`` (0 when the section or the key is absent or null)."""
    return int((cfg.get("finetune") or {}).get("folds", 0) or 0)


def route_of(cfg: DictConfig) -> str:
    """``cfg.finetune.route`` (``"auto"`` when the section or the key is absent or null)."""
    return str((cfg.get("finetune") or {}).get("route", "auto") or "auto")


def _probe_epochs(max_epochs: int, every: int) -> list[int]:
    """Epochs at which the held-out fold is placed: 0, every, 2 every, ..., max_epochs."""
    return sorted({0, max_epochs, *range(every, max_epochs, every)})


@dataclass
class Fold:
    """One fold of the fine-tuning cells: the held-out cells and the fit's training cells
    (expression rows on the model's genes, original coordinates, section numbers)."""

    held_raw: Any
    fit_raw: Any
    held_coords: np.ndarray
    fit_coords: np.ndarray
    held_group: np.ndarray
    fit_group: np.ndarray


class FoldProbe(L.Callback):
    """Places a fold fit's held-out cells at the probe epochs (0: before the first step)."""

    def __init__(self, fold: Fold, epochs: list[int], k: int, expression_weight: float) -> None:
        self.fold = fold
        self.epochs = set(epochs)
        self.k, self.expression_weight = k, expression_weight
        #: epoch -> (error, calibration score, placement) of each held-out cell (original units)
        self.found: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if 0 in self.epochs:
            self.found[0] = self.probe(pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        epoch = trainer.current_epoch + 1
        if epoch in self.epochs:
            self.found[epoch] = self.probe(pl_module)

    def probe(self, model: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return fold_scores(model, self.fold, self.k, self.expression_weight)


def fold_scores(
    model: Parts, fold: Fold, k: int, expression_weight: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Held-out cells placed against a fit's training cells of their own section, as a query is
    against the anchors: ``(error in the cells' original units, calibration score, placement in
    the original units)`` per cell."""
    from dpvae.placement import placement_errors, spread_floor

    pre = model.preprocessor
    held_latent, held_pcs = model.embed(fold.held_raw, with_pcs=True)
    fit_latent, fit_pcs = model.embed(fold.fit_raw, with_pcs=True)
    floor = spread_floor(pre)
    # placement is translation-equivariant: one scale (no section centres) gives model units
    held_m, fit_m = fold.held_coords / pre.coord_scale, fold.fit_coords / pre.coord_scale
    error = np.full(len(held_latent), np.nan)
    spread = np.full(len(held_latent), np.nan)
    placed = np.full(held_m.shape, np.nan)
    for g in np.unique(fold.held_group):
        mine, against = fold.held_group == g, fold.fit_group == g
        if not against.any():
            continue
        error[mine], spread[mine], placed[mine] = placement_errors(
            model,
            held_latent[mine],
            fit_latent[against],
            held_m[mine],
            fit_m[against],
            query_pcs=None if held_pcs is None else held_pcs[mine],
            ref_pcs=None if fit_pcs is None else fit_pcs[against],
            k=k,
            expression_weight=expression_weight,
        )
    return error * pre.coord_scale, error / (spread + floor), placed * pre.coord_scale


def _fold_reference(cells: Any, rows: np.ndarray, genes: list[str]) -> Any:
    """The cells ``rows`` of a datamodule's :class:`~dpvae.contracts.Cells` as the reference of
    a fold fit: one AnnData per section (a list for several), expression in ``X`` on ``genes``."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    def one(sel: np.ndarray) -> ad.AnnData:
        x = cells.raw[sel]
        out = ad.AnnData(
            X=sp.csr_matrix(x) if not sp.issparse(x) else x.tocsr(),
            obs=pd.DataFrame(index=pd.Index(np.asarray(cells.names[sel]).astype(str))),
            var=pd.DataFrame(index=pd.Index(genes)),
        )
        out.obsm["spatial"] = np.asarray(cells.coords[sel], dtype=np.float64)
        return out

    if cells.section is None:
        return one(rows)
    groups = np.asarray(cells.section).astype(str)[rows]
    return [one(rows[groups == s]) for s in dict.fromkeys(groups)]


def cross_validate(
    cfg: DictConfig, data: Any, init: Parts, source: ReferenceEmbedding | None = None
) -> CrossValidation | None:
    """Choose the fine-tuning schedule and calibrate the radius by ``cfg.finetune.folds`` fits.

    With ``source``, the starting model's reference cells (section A), the same folds also
    score the route through them (:func:`dpvae.anchors.route_over_cells`: each held-out cell
    placed in A's frame and carried by the motion fitted to the other folds); where its pooled
    held-out dist_pearson beats the fine-tuned placement's against the anchors, the route is
    ``"through"`` and the final fit keeps the starting model (0 epochs). On 13 breast-cancer
    anchors the route through A scored 0.47 against 0.38; on 180 DLPFC anchors 0.70 against 0.72.

    Returns ``None`` (the schedule of ``trainer.max_epochs``, and no radius: every cell is then
    a training cell) when ``finetune.folds`` is below 2, ``trainer.max_epochs`` is not set, or the
    cells are too few for fold fits of :data:`MIN_FOLD_CELLS` training cells. Folds are at most
    one per cell.
    """
    from omegaconf import DictConfig, OmegaConf

    from dpvae.anchors import anchor_folds, route_over_cells
    from dpvae.errors import ConfigError, DataError, check_finetune_options
    from dpvae.placement import (
        EXPRESSION_WEIGHT,
        MIN_CALIBRATION,
        NEIGHBOURS,
        radius_record,
        spread_floor,
    )

    spec = cfg.get("finetune") or {}
    route = route_of(cfg)
    folds = folds_of(cfg)
    check_finetune_options(route=route, folds=folds)
    max_epochs = cfg.trainer.get("max_epochs")
    if route == "through" and (folds < 2 or max_epochs in (None, -1)):
        raise ConfigError(
            "finetune.route=through is scored by the folds: set finetune.folds to 2 or more and "
            "trainer.max_epochs, or use finetune.route=anchors"
        )
    if folds < 2 or max_epochs in (None, -1):
        return None
    cells = data.cells("train")
    if route == "through" and (source is None or cells.section is not None):
        raise DataError(
            "finetune.route=through needs the starting run's reference cells (its "
            "embedding.h5ad) and one section of fine-tuning cells; use finetune.route=anchors"
        )
    n = len(cells)
    folds = min(folds, n)
    if folds < 2 or n - -(-n // folds) < MIN_FOLD_CELLS:  # the largest fold leaves too few
        if route == "through":
            raise DataError(
                f"finetune.route=through needs folds of at least {MIN_FOLD_CELLS} training "
                f"cells; {n} fine-tuning cells are too few: give more or use finetune.route=anchors"
            )
        return None
    every = max(1, int(spec.get("every_n_epochs", 5) or 5))
    epochs = _probe_epochs(int(max_epochs), every)
    groups = (
        np.zeros(n, dtype=np.int64)
        if cells.section is None
        else np.unique(np.asarray(cells.section).astype(str), return_inverse=True)[1]
    )
    genes = list(init.genes)
    fold = anchor_folds(n, int(cfg.seed), folds)
    sub = OmegaConf.merge(
        cfg,
        {
            "finetune": {"folds": 0, "route": "auto"},  # a fold fit: no folds of its own
            "logger": None,
            "trainer": {"devices": 1, "num_nodes": 1, "strategy": "auto"},
            "callbacks": {"report": None},
            "data": {"layer": None, "spatial_key": "spatial"},
        },
    )
    from dpvae.pipeline import train

    assert isinstance(sub, DictConfig)

    errors: dict[int, list[np.ndarray]] = {e: [] for e in epochs}
    scores: dict[int, list[np.ndarray]] = {e: [] for e in epochs}
    placed: dict[int, list[np.ndarray]] = {e: [] for e in epochs}
    held_rows: list[np.ndarray] = []
    for f in range(folds):
        held, fit = np.flatnonzero(fold == f), np.flatnonzero(fold != f)
        part = Fold(
            cells.raw[held],
            cells.raw[fit],
            cells.coords[held],
            cells.coords[fit],
            groups[held],
            groups[fit],
        )
        probe = FoldProbe(part, epochs, NEIGHBOURS, EXPRESSION_WEIGHT)
        train(sub, reference=_fold_reference(cells, fit, genes), init=init, extra_callbacks=[probe])
        held_rows.append(held)
        for e, (err, score, where) in probe.found.items():
            errors[e].append(err)
            scores[e].append(score)
            placed[e].append(where)
    mean = {}
    spacing = float(data.preprocessor.ref_nn_distance)
    for e in epochs:
        if errors[e]:
            err = np.concatenate(errors[e]) / spacing
            mean[e] = float(np.nanmean(err)) if np.isfinite(err).any() else float("inf")
    if not mean:
        return None
    best = min(mean, key=lambda e: (mean[e], e))
    s = np.concatenate(scores[best])
    s = s[np.isfinite(s)]
    calibration = None
    if len(s) >= MIN_CALIBRATION:
        calibration = radius_record(
            s,
            spread_floor(data.preprocessor),  # the final model's frame: the data's
            f"cross-validation over the {n} fine-tuning cells: each placed against the other "
            f"folds' cells by a fit that never saw it ({folds} folds, {best} epochs)",
        )
    cv = CrossValidation(epochs=best, errors=mean, calibration=calibration, folds=folds)
    if len(placed[best]) == folds:
        rows = np.concatenate(held_rows)
        cv.scores["anchors"] = _pooled_pearson(np.concatenate(placed[best]), cells.coords[rows])
    if (
        route != "anchors"
        and source is not None
        and cells.section is None
        and "anchors" in cv.scores
    ):
        found = route_over_cells(
            init,
            source,
            cells.raw,
            cells.coords,
            fold,
            k=NEIGHBOURS,
            expression_weight=EXPRESSION_WEIGHT,
        )
        cv.scores["through"] = _pooled_pearson(found.held_out, cells.coords)
        if route == "through" or cv.scores["through"] > cv.scores["anchors"]:
            cv.route, cv.epochs = "through", 0
    return cv


def _pooled_pearson(placed: np.ndarray, truth: np.ndarray) -> float:
    """dist_pearson of held-out placements (NaN rows left out; -inf for fewer than 3 cells)."""
    from dpvae.metrics import dist_pearson

    ok = np.isfinite(placed).all(axis=1) & np.isfinite(truth).all(axis=1)
    if int(ok.sum()) < 3:
        return float("-inf")
    value = dist_pearson(placed[ok], truth[ok])
    return value if np.isfinite(value) else float("-inf")
