"""Placing cells from their latent codes: the one owner of every placement rule.

Training's validation callback, ``dpvae-predict``, :class:`dpvae.api.Model` and the benchmark all
place cells through this module, so each rule exists once:

- **the neighbour search** (:func:`place`): a query cell sits at the distance-weighted mean of its
  ``k`` nearest reference cells, searched in the latent code joined with the reference's leading
  expression principal components (:func:`joint_space`), optionally after centring a new batch on
  the reference (``align_query``) or refined by stress majorisation (``n_iter``);
- **the in-sample calibration** (:func:`calibrate_in_sample`): codes of the cells the encoder trained
  on are shrunk to the spread of cells it never saw before they serve as a reference;
- **the embedding file format** (:class:`ReferenceEmbedding`): ``embedding.h5ad`` of a run, written
  by training and read by prediction;
- **AnnData in, coordinates out** (:func:`encode`, :func:`predict`): genes matched by name, the
  checkpoint's own reference found next to it, scores when the truth is known.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from dpvae.errors import MODES as MODES  # re-exported: prediction's modes
from dpvae.errors import DataError, DPVAEWarning, check_options
from dpvae.io import check_missing_genes, gene_names

if TYPE_CHECKING:
    import anndata as ad

    from dpvae.contracts import ReferenceData
    from dpvae.network import Parts

#: Reference neighbours that place a query cell (chosen over all dev datasets with the calibrated
#: joint search; BENCHMARKS.md).
NEIGHBOURS = 8
#: Weight of the expression part of the joint neighbour search, each part at unit spread. One
#: value for every dataset, chosen over all dev datasets (BENCHMARKS.md): lower favours the latent
#: code (BDTNP), higher the expression (the breast-array transfer).
EXPRESSION_WEIGHT = 1.25
#: The file a training run writes beside its checkpoint, and its format tag in ``uns['dpvae']``.
EMBEDDING_FILE = "embedding.h5ad"
EMBEDDING_FORMAT = "dpvae.embedding/1"
#: ``obsm`` key of the reference's expression principal components in an embedding file.
EXPR_PCS = "X_expr_pcs"


# ------------------------------------------------------------------------------ the rules
def rms_spread(x: Any) -> float:
    """Root-mean-square distance of the rows of ``x`` (numpy array or tensor) to their mean."""
    return float((((x - x.mean(0)) ** 2).sum(1).mean()) ** 0.5)


def calibrate_in_sample(latent: Any, in_sample: Any) -> tuple[Any, float]:
    """Shrink the training cells' latent codes to the spread of cells the encoder never saw.

    The encoder fits its training cells' distance constraints more tightly than it generalises:
    their codes spread wider than those of held-out cells and of query cells (DLPFC: rms 2.05 vs
    1.64), so a query cell's nearest references are biased towards the held-out ones. The rows
    flagged ``in_sample`` are scaled about their mean by rms spread(held-out) / rms spread
    (in-sample), never enlarged. Rows need no particular order; numpy arrays and torch tensors
    both work. With fewer than two held-out or in-sample rows nothing is scaled.

    Returns:
        (a calibrated copy of ``latent``, the scale applied).
    """
    mask = in_sample.astype(bool) if hasattr(in_sample, "astype") else in_sample.bool()
    out = latent.clone() if hasattr(latent, "clone") else latent.copy()
    n_in = int(mask.sum())
    if n_in < 2 or len(latent) - n_in < 2:
        return out, 1.0
    inside, outside = latent[mask], latent[~mask]
    scale = rms_spread(outside) / max(rms_spread(inside), 1e-12)
    if scale >= 1.0:
        return out, 1.0
    center = inside.mean(0)
    out[mask] = center + (inside - center) * scale
    return out, scale


def joint_space(
    ref_latent: Tensor,
    query_latent: Tensor,
    ref_extra: Tensor | None = None,
    query_extra: Tensor | None = None,
    weight: float = EXPRESSION_WEIGHT,
) -> tuple[Tensor, Tensor]:
    """Reference and query codes for a neighbour search over latent and extra features together.

    Each part is divided by its root-mean-square spread over the reference cells, so both count
    equally before ``weight`` multiplies the extra part (expression principal components). Without
    extra features, or with ``weight`` 0, the latent codes are returned as they are.
    """
    if ref_extra is None or query_extra is None or weight <= 0:
        return ref_latent, query_latent
    sz, se = _joint_scales(ref_latent, ref_extra)
    ref = torch.cat([ref_latent / sz, weight * ref_extra / se], dim=1)
    query = torch.cat([query_latent / sz, weight * query_extra / se], dim=1)
    return ref, query


def _joint_scales(ref_latent: Tensor, ref_extra: Tensor) -> tuple[float, float]:
    """The reference's rms spreads of its latent and extra parts (each at least 1e-12)."""
    return max(rms_spread(ref_latent), 1e-12), max(rms_spread(ref_extra), 1e-12)


def _as_tensor(x: Any, device: torch.device | None) -> Tensor:
    return torch.as_tensor(x, device=device)


#: Query cells transformed and placed per block by :func:`place` (the search itself runs in
#: blocks of 4096 inside): the query's float64 copies stay bounded whatever its size.
PLACE_BLOCK = 65_536


@torch.no_grad()
def place(
    query_latent: Any,
    ref_latent: Any,
    ref_coords: Any,
    *,
    query_pcs: Any = None,
    ref_pcs: Any = None,
    scale: float = 1.0,
    k: int = NEIGHBOURS,
    n_iter: int = 0,
    expression_weight: float = EXPRESSION_WEIGHT,
    align_query: bool = False,
    block: int = PLACE_BLOCK,
    spread: Tensor | None = None,
) -> Tensor:
    """Query coordinates in the frame of ``ref_coords`` (float64, on the reference's device).

    ``spread`` (m,), when given, receives each cell's neighbour spread (the weighted RMS distance
    of its neighbours' coordinates from its placement, :func:`dpvae.solver.knn_mean`), the
    difficulty that :func:`conformal_radius` scales into a calibrated radius.

    ``ref_latent`` should already be calibrated (:meth:`ReferenceEmbedding.search_latent`).
    ``align_query``: the query is another batch (a new section, dissociated cells): its latent
    codes and expression PCs are shifted so that their mean is the reference's before the search,
    removing the batch's overall expression shift (DLPFC 151673 -> 151674: dist_pearson 0.61 ->
    0.68). Leave it off for a sample of the reference's own tissue, whose composition may differ.

    With expression PCs on both sides (and ``n_iter`` 0), neighbours are searched in the joint
    space of :func:`joint_space`; otherwise in the latent code alone, and ``n_iter`` > 0 then
    minimises the weighted stress to the ``k`` neighbours (:func:`dpvae.solver.impute`), which on
    the dev data lowered dist_pearson everywhere (latent distances between adjacent cells do not
    shrink to zero), so it is off by default. ``k`` is capped at the reference size.

    The reference's neighbour index (:class:`dpvae.neighbours.NeighbourIndex`) is built once; the
    query is shifted, scaled and placed ``block`` rows at a time, each row independently of the
    others (the same placements as one block).
    """
    from dpvae.neighbours import NeighbourIndex, release_memory
    from dpvae.solver import impute, knn_mean

    device = ref_coords.device if isinstance(ref_coords, Tensor) else None
    zr = _as_tensor(ref_latent, device).double()
    coords = _as_tensor(ref_coords, device).double()
    n_query = len(query_latent)
    k = min(int(k), len(zr))
    z_shift: tuple[Tensor, Tensor] | None = None
    pc_shift: tuple[Any, Any] | None = None
    if align_query:
        z_shift = (_as_tensor(query_latent, device).double().mean(dim=0), zr.mean(dim=0))
        if query_pcs is not None and ref_pcs is not None:
            pc_shift = (query_pcs.mean(0), ref_pcs.mean(0))
    joint = n_iter == 0 and query_pcs is not None and ref_pcs is not None
    joint = joint and expression_weight > 0
    scales = (1.0, 1.0)
    if joint:
        er = _as_tensor(ref_pcs, device).double()
        scales = _joint_scales(zr, er)
        search_ref = torch.cat([zr / scales[0], expression_weight * er / scales[1]], dim=1)
        del er
    else:
        search_ref = zr
    index = NeighbourIndex(search_ref)
    out = torch.empty(n_query, coords.shape[1], dtype=torch.float64, device=coords.device)
    for start in range(0, n_query, block):
        rows = slice(start, start + block)
        zq = _as_tensor(query_latent[rows], device).double()
        if z_shift is not None:
            zq = zq - z_shift[0] + z_shift[1]
        if joint:
            qp = query_pcs[rows]
            if pc_shift is not None:
                qp = qp - pc_shift[0] + pc_shift[1]
            eq = _as_tensor(qp, device).double()
            jq = torch.cat([zq / scales[0], expression_weight * eq / scales[1]], dim=1)
            part = None if spread is None else spread[rows]
            out[rows] = knn_mean(jq, search_ref, coords, k=k, index=index, spread=part)
        else:
            part = None if spread is None else spread[rows]
            out[rows] = impute(
                zq, search_ref, coords, scale=scale, k=k, n_iter=n_iter, index=index, spread=part
            )
    del index
    release_memory()
    return out


def place_against(
    model: Any,
    ref: ReferenceEmbedding,
    latent: Any,
    pcs: Any,
    *,
    k: int,
    expression_weight: float,
    align_query: bool,
    n_iter: int = 0,
    spread: Tensor | None = None,
) -> Tensor:
    """:func:`place` of cells (latent codes, expression PCs) against the reference cells ``ref``,
    in ``model``'s units (its frame and lambda)."""
    return place(
        latent,
        ref.search_latent(),
        model.preprocessor.coords_to_model(ref.coords),
        query_pcs=pcs,
        ref_pcs=ref.pcs,
        scale=model.scale_value(),
        k=k,
        n_iter=n_iter,
        expression_weight=expression_weight,
        align_query=align_query,
        spread=spread,
    )


# ------------------------------------------------------------------ per-cell uncertainty
#: the probability a cell's radius holds its true position with
RADIUS_COVERAGE = 0.9
#: the ``obs`` column of the calibrated radius
RADIUS_KEY = "dpvae_radius90"
#: at most this many reference cells calibrate the radius
MAX_CALIBRATION = 5000
#: folds of the cross-conformal calibration of a reference of cells all new to the model
CALIBRATION_FOLDS = 5
#: at most this share of the held-out cells leaves the reference at a time when they calibrate
HELD_OUT_SHARE = 0.1
#: the difficulty's floor, in reference cell spacings (a cell whose neighbours coincide)
SPREAD_FLOOR = 0.05
#: the fewest calibration cells that give a radius (from 9 on it holds at ``RADIUS_COVERAGE``;
#: fewer give ``n / (n + 1)``, which the record's ``level`` says and prediction warns of)
MIN_CALIBRATION = 4


def conformal_radius(
    model: Any,
    ref: ReferenceEmbedding,
    *,
    k: int = NEIGHBOURS,
    expression_weight: float = EXPRESSION_WEIGHT,
    seed: int = 0,
    spacing: float | None = None,
) -> dict[str, Any] | None:
    """Calibrate the per-cell radius ``r = quantile * (spread + floor)`` on reference cells.

    Split-conformal regression with a per-cell difficulty: reference cells whose positions the
    model was not told are placed by the rule of prediction against other reference cells, and
    ``quantile`` is the conformal ``RADIUS_COVERAGE`` quantile of their error / (neighbour
    spread + ``SPREAD_FLOOR`` cell spacings). When the reference says which cells the model
    trained on (``in_sample``: the run's own cells), only the others calibrate: the run's
    held-out (validation) cells, each placed against every reference cell outside its fold
    (folds of at most ``HELD_OUT_SHARE`` of the held-out cells: the query meets the same mix of
    training and held-out codes); a run without ``MIN_CALIBRATION`` of them gets no radius (a
    training cell's error is the model's own fit, far smaller than a new cell's). A reference
    of cells all new to the model (an expression file embedded at prediction) calibrates on
    every cell: up to 10 x ``MAX_CALIBRATION`` cells each placed against the other folds of
    ``CALIBRATION_FOLDS``, else ``MAX_CALIBRATION`` cells against the rest. A reference that
    carries its own record (:attr:`ReferenceEmbedding.calibration`: a fine-tuned model's
    anchors, every one a training cell, calibrated by the fine-tuning's cross-validation on
    anchors its fits never saw) keeps it, for the ``k`` and ``expression_weight`` it was
    made with (others: no radius). A query exchangeable with the calibration cells is then
    covered with probability at least the record's ``level`` (``RADIUS_COVERAGE`` from 9
    calibration cells on, :func:`conformal_rank`); cells of another section or tissue are not
    exchangeable, so coverage there is measured by the benchmark rather than promised.

    ``spacing``: the reference's cell spacing in its own units (default: the model's training
    reference's), of which the difficulty's floor is ``SPREAD_FLOOR``.

    Returns the record written to ``uns['dpvae']['radius']`` (``quantile`` and ``floor`` in model
    units), or ``None`` (with a warning saying why) when no honest radius can be calibrated.
    """
    if ref.calibration is not None:  # fine-tuning's cross-validation (cells the fits never saw)
        made = (
            int(ref.calibration.get("k", NEIGHBOURS)),
            float(ref.calibration.get("expression_weight", EXPRESSION_WEIGHT)),
        )
        if made == (int(k), float(expression_weight)):
            return dict(ref.calibration)
        _no_radius(
            f"the radius was calibrated for k={made[0]} and expression_weight={made[1]:g}; "
            "predict with those for a 90% radius"
        )
        return None
    pre = model.preprocessor
    n = len(ref)
    rng = np.random.default_rng(seed)
    splits: list[tuple[np.ndarray, np.ndarray]] = []
    held_out = None if ref.in_sample is None else ~np.asarray(ref.in_sample, dtype=bool)
    if held_out is not None:
        n_held = int(held_out.sum())
        if n_held < MIN_CALIBRATION or n - n_held < 2:
            _no_radius(
                f"the reference holds {n_held} cells the model did not train on and "
                f"{n - n_held} it did; a 90% radius is calibrated on {MIN_CALIBRATION} or more "
                "held-out cells (train with a larger data.val_fraction, or pass reference= "
                "cells the model never saw)"
            )
            return None
        # a query is placed against training and held-out cells together, and its neighbour
        # spread depends on that mix (held-out codes are the encoder's out-of-sample ones): so
        # each calibration cell is placed against every reference cell but its own fold, the
        # folds taking at most HELD_OUT_SHARE of the held-out cells out at a time (DLPFC: the
        # query's spread is 6.6 cell spacings against all cells, 4.6 against training cells
        # alone, with the same errors; against training cells the radius covered 0.97)
        cal = np.flatnonzero(held_out)
        if len(cal) > MAX_CALIBRATION:
            cal = np.sort(rng.choice(cal, MAX_CALIBRATION, replace=False))
        n_folds = min(len(cal), int(np.ceil(len(cal) / (HELD_OUT_SHARE * n_held))))
        fold = rng.permutation(len(cal)) % n_folds
        keep = np.ones(n, dtype=bool)
        for f in range(n_folds):
            mine = cal[fold == f]
            keep[mine] = False
            splits.append((mine, np.flatnonzero(keep)))
            keep[mine] = True
        how = (
            "the run's held-out reference cells, each placed against the other reference cells "
            f"({n_folds} folds)"
        )
    elif n < MIN_CALIBRATION:
        _no_radius(
            f"the reference has {n} cells; a 90% radius is calibrated on {MIN_CALIBRATION} or more"
        )
        return None
    elif n <= 10 * MAX_CALIBRATION:
        fold = rng.permutation(n) % CALIBRATION_FOLDS
        splits = [
            (np.flatnonzero(fold == f), np.flatnonzero(fold != f)) for f in range(CALIBRATION_FOLDS)
        ]
        how = f"every reference cell placed against the other {CALIBRATION_FOLDS - 1} of {CALIBRATION_FOLDS} folds"
    else:
        cal = np.sort(rng.choice(n, MAX_CALIBRATION, replace=False))
        rest = np.setdiff1d(np.arange(n), cal)
        splits.append((cal, rest))
        how = f"{MAX_CALIBRATION} reference cells placed against the others"
    latent = ref.search_latent()
    coords = pre.coords_to_model(ref.coords)
    floor = spread_floor(pre, spacing)
    scores = []
    for cal, against in splits:
        if len(cal) == 0 or len(against) == 0:
            continue
        error, spread, _ = placement_errors(
            model,
            latent[cal],
            latent[against],
            coords[cal],
            coords[against],
            query_pcs=None if ref.pcs is None else ref.pcs[cal],
            ref_pcs=None if ref.pcs is None else ref.pcs[against],
            k=k,
            expression_weight=expression_weight,
        )
        scores.append(error / (spread + floor))
    if not scores:
        return None
    return radius_record(np.concatenate(scores), floor, how, k, expression_weight)


def _no_radius(why: str) -> None:
    """Warn that prediction writes no radius, and why."""
    warnings.warn(f"no {RADIUS_KEY}: {why}", DPVAEWarning, stacklevel=3)


def own_spacing(ref: ReferenceEmbedding, default: float) -> float:
    """The reference cells' median nearest-neighbour distance in their own units (``default``
    for fewer than 2 cells, or when more than half of them share a position)."""
    from dpvae.metrics import median_nn_distance

    if len(ref) < 2:
        return float(default)
    spacing = median_nn_distance(ref.coords)
    return spacing if np.isfinite(spacing) and spacing > 0 else float(default)


def spread_floor(pre: Any, spacing: float | None = None) -> float:
    """The difficulty's floor in model units: ``SPREAD_FLOOR`` reference cell spacings
    (``spacing`` in the reference's own units; default: the training reference's)."""
    spacing = pre.ref_nn_distance if spacing is None else spacing
    return float(SPREAD_FLOOR * spacing / pre.coord_scale)


def placement_errors(
    model: Any,
    query_latent: np.ndarray,
    ref_latent: np.ndarray,
    query_coords: np.ndarray,
    ref_coords: np.ndarray,
    *,
    query_pcs: np.ndarray | None = None,
    ref_pcs: np.ndarray | None = None,
    k: int = NEIGHBOURS,
    expression_weight: float = EXPRESSION_WEIGHT,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(error, spread, placement)`` of cells of known position placed against others as a
    query is.

    Coordinates are in any one frame (model units, or original units for both); the error
    (distance of placement to truth), the neighbour spread and the placement are in its units.
    """
    spread = torch.empty(len(query_latent), dtype=torch.float64)
    pred = place(
        query_latent,
        ref_latent,
        torch.as_tensor(ref_coords, dtype=torch.float64),
        query_pcs=query_pcs,
        ref_pcs=ref_pcs,
        scale=model.scale_value(),
        k=min(k, len(ref_latent)),
        expression_weight=expression_weight,
        spread=spread,
    )
    placed = pred.cpu().numpy()
    error = np.linalg.norm(placed - query_coords, axis=1)
    return error, spread.numpy(), placed


def conformal_rank(n: int, coverage: float = RADIUS_COVERAGE) -> int:
    """The rank (1-based) of the conformal ``coverage`` quantile among ``n`` calibration scores:
    ``ceil((n + 1) * coverage)``, at most ``n`` (fewer than 9 scores at 90%: the largest). A new
    exchangeable score is at most that order statistic with probability ``rank / (n + 1)``: 19
    of 20 scores give 0.905, not less than ``coverage``; 5 scores, the largest, only 5/6."""
    return max(1, min(n, int(np.ceil((n + 1) * coverage - 1e-9))))


def radius_record(
    scores: np.ndarray,
    floor: float,
    how: str,
    k: int = NEIGHBOURS,
    expression_weight: float = EXPRESSION_WEIGHT,
) -> dict[str, Any]:
    """The calibration record of ``uns['dpvae']['radius']`` from the calibration cells' scores
    (error / difficulty): their conformal ``RADIUS_COVERAGE`` quantile, the
    :func:`conformal_rank`-th smallest score; ``level``, the coverage it guarantees an
    exchangeable cell (``rank / (n + 1)``: below ``RADIUS_COVERAGE`` under 9 scores); ``k`` and
    ``expression_weight``, the placement rule it holds for."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    rank = conformal_rank(len(s))
    return {
        "coverage": RADIUS_COVERAGE,
        "quantile": float(s[rank - 1]),
        "rank": rank,
        "level": rank / (len(s) + 1),
        "k": int(k),
        "expression_weight": float(expression_weight),
        "floor": float(floor),
        "n_calibration": int(len(s)),
        "calibration": how,
        "difficulty": "inverse-distance weighted RMS distance of the k neighbours' coordinates "
        f"from the placement, plus {SPREAD_FLOOR} reference cell spacings",
        "method": "split-conformal: radius = quantile of error / difficulty on the calibration "
        "cells, times the cell's difficulty",
    }


# ------------------------------------------------------------------ the embedding format
#: ``uns['dpvae']`` key of an embedding's own radius calibration (fine-tuning's cross-validation)
CALIBRATION_KEY = "radius_calibration"


def _plain_record(record: Any) -> dict[str, Any] | None:
    """A record read back from ``uns`` with numpy scalars as Python values (``None`` stays)."""
    if not isinstance(record, dict):
        return None
    return {str(k): v.item() if hasattr(v, "item") else v for k, v in record.items()}


@dataclass
class ReferenceEmbedding:
    """Reference cells as prediction needs them: codes, coordinates, expression PCs, split.

    Attributes:
        latent: (n, L) the model's codes, as they are (uncalibrated).
        coords: (n, D) coordinates in the reference's original units.
        pcs: (n, P) expression principal components, or ``None`` when the model has none.
        in_sample: (n,) True for the cells the model trained on, or ``None`` when every cell is
            new to it (an expression reference embedded at prediction time).
        names: cell names, or ``None``.
        genes: the model's genes; scale: its lambda.
        section: (n,) each cell's section name (a reference of several sections, whose
            coordinates are in unrelated frames), or ``None`` for one section.
        sections: the section names in the reference's order (the first is the default frame
            of :meth:`select_section`); empty for one section.
        calibration: the radius record of :func:`conformal_radius` made when the model was
            trained (fine-tuning's cross-validation), or ``None`` (calibrated at prediction).
        calibrated: ``latent`` already holds the search codes (the in-sample calibration applied
            over a larger reference, as :meth:`select_section` does), so :meth:`search_latent`
            returns it as it is while ``in_sample`` still tells which cells the model trained on.
    """

    latent: np.ndarray
    coords: np.ndarray
    pcs: np.ndarray | None = None
    in_sample: np.ndarray | None = None
    names: np.ndarray | None = None
    genes: list[str] = field(default_factory=list)
    scale: float = 1.0
    section: np.ndarray | None = None
    sections: tuple[str, ...] = ()
    calibration: dict[str, Any] | None = None
    calibrated: bool = False

    def __len__(self) -> int:
        return len(self.latent)

    def select_section(self, name: str | None = None) -> tuple[ReferenceEmbedding, str | None]:
        """The cells of one section (``None``: the first), calibrated first over all cells.

        Returns ``(reference, section name)``; a one-section reference is returned as it is
        (with ``None``) when no name is asked for. The in-sample calibration is applied before
        the cells are filtered (the encoder's over-fit is one for all sections): the result holds
        the search codes (``calibrated``) and keeps ``in_sample``, so that its radius is
        calibrated on the section's held-out cells only.

        Raises:
            ConfigError: ``name`` is not one of :attr:`sections`.
        """
        from dpvae.errors import ConfigError

        names = tuple(self.sections)
        if self.section is None or not names:
            if name is None:
                return self, None
            raise ConfigError(
                f"reference_section={name}: the reference has no named sections; leave "
                "reference_section unset"
            )
        chosen = names[0] if name is None else str(name)
        if chosen not in names:
            raise ConfigError(
                f"reference_section={chosen}: no such section in the reference; its sections: "
                f"{', '.join(names)}"
            )
        if len(names) == 1 and name is None:
            return self, chosen
        keep = np.asarray(self.section).astype(str) == chosen
        latent = self.search_latent()[keep]
        out = ReferenceEmbedding(
            latent=latent,
            coords=self.coords[keep],
            pcs=None if self.pcs is None else self.pcs[keep],
            in_sample=None if self.in_sample is None else np.asarray(self.in_sample)[keep],
            names=None if self.names is None else self.names[keep],
            genes=list(self.genes),
            scale=self.scale,
            section=np.asarray(self.section)[keep],
            sections=(chosen,),
            calibration=self.calibration,
            calibrated=True,
        )
        return out, chosen

    def search_latent(self) -> np.ndarray:
        """Codes to search among: training cells calibrated against held-out ones."""
        if self.in_sample is None or self.calibrated:
            return self.latent
        return calibrate_in_sample(self.latent, self.in_sample)[0]

    def to_anndata(self) -> ad.AnnData:
        """The ``embedding.h5ad`` layout: codes in ``X``, ``obs['split']``, ``obsm['spatial']``."""
        import anndata as ad
        import pandas as pd

        obs = pd.DataFrame(index=None if self.names is None else pd.Index(self.names, dtype=str))
        if self.in_sample is not None and not self.calibrated:
            split = np.where(self.in_sample, "train", "val").astype(object)
            obs["split"] = pd.Categorical(split, categories=["train", "val"])
        if self.section is not None and self.sections:
            obs["section"] = pd.Categorical(
                np.asarray(self.section).astype(str), categories=list(self.sections)
            )
        out = ad.AnnData(
            X=np.asarray(self.latent, dtype=np.float32),
            obs=obs,
            var=pd.DataFrame(index=[f"latent_{i}" for i in range(self.latent.shape[1])]),
        )
        out.obsm["spatial"] = np.asarray(self.coords, dtype=np.float64)
        if self.pcs is not None:
            out.obsm[EXPR_PCS] = np.asarray(self.pcs)
        out.uns["dpvae"] = {
            "format": EMBEDDING_FORMAT,
            "lambda": float(self.scale),
            "genes": list(self.genes),
        }
        if self.section is not None and self.sections:
            out.uns["dpvae"]["sections"] = list(self.sections)
        if self.calibration is not None:
            out.uns["dpvae"][CALIBRATION_KEY] = dict(self.calibration)
        return out

    def write(self, path: str | Path) -> Path:
        """Write :meth:`to_anndata` atomically (temporary file and rename)."""
        from dpvae.io import write_h5ad_atomic

        return write_h5ad_atomic(self.to_anndata(), path)

    @staticmethod
    def is_embedding(adata: ad.AnnData) -> bool:
        """Whether ``adata`` is an embedding file (by its format tag, not by its names)."""
        info = adata.uns.get("dpvae", {})
        return isinstance(info, dict) and info.get("format") == EMBEDDING_FORMAT

    @classmethod
    def from_anndata(cls, adata: ad.AnnData, latent_dim: int | None = None) -> ReferenceEmbedding:
        """Inverse of :meth:`to_anndata`.

        Raises:
            DataError: not an embedding file, or one of another latent width.
        """
        from dpvae.io import get_coordinates

        if not cls.is_embedding(adata):
            raise DataError("not a dpvae embedding file (no uns['dpvae']['format'])")
        latent = np.asarray(adata.X, dtype=np.float32)
        if latent_dim is not None and latent.shape[1] != latent_dim:
            raise DataError(
                f"the embedding has {latent.shape[1]} latent dimensions but the model "
                f"{latent_dim}; use the embedding.h5ad written with this checkpoint"
            )
        in_sample = None
        if "split" in adata.obs:
            in_sample = np.asarray(adata.obs["split"].astype(str) == "train")
        info = adata.uns["dpvae"]
        section: np.ndarray | None = None
        sections: tuple[str, ...] = ()
        if "section" in adata.obs:
            column = adata.obs["section"]
            listed = info.get("sections")
            if listed is not None and len(listed):
                sections = tuple(str(v) for v in listed)
            elif hasattr(column, "cat"):
                sections = tuple(str(v) for v in column.cat.categories)
            else:
                sections = tuple(dict.fromkeys(column.astype(str)))
            section = np.asarray(column.astype(str))
        return cls(
            latent=latent,
            coords=get_coordinates(adata, "spatial"),
            pcs=np.asarray(adata.obsm[EXPR_PCS]) if EXPR_PCS in adata.obsm else None,
            in_sample=in_sample,
            names=np.asarray(adata.obs_names).astype(str),
            genes=[str(g) for g in info.get("genes", [])],
            scale=float(info.get("lambda", 1.0)),
            section=section,
            sections=sections,
            calibration=_plain_record(info.get(CALIBRATION_KEY)),
        )

    @classmethod
    def read(cls, path: str | Path, latent_dim: int | None = None) -> ReferenceEmbedding:
        """Read an ``embedding.h5ad`` written by :meth:`write`."""
        from dpvae.io import read_h5ad

        return cls.from_anndata(read_h5ad(path, backed=False), latent_dim)


def embed_reference(
    model: Parts,
    data: ReferenceData,
    batch_size: int = 4096,
    calibration: dict[str, Any] | None = None,
) -> ReferenceEmbedding:
    """The embedding of every reference cell of a fitted datamodule (its cell order);
    ``calibration``: the run's own radius record (:attr:`ReferenceEmbedding.calibration`)."""
    cells = data.cells("all")
    latent, pcs = model.embed(cells.raw, batch_size=batch_size, with_pcs=True)
    in_sample = np.zeros(len(latent), dtype=bool)
    in_sample[data.cells("train").index] = True
    section = getattr(cells, "section", None)
    sections = tuple(str(v) for v in (getattr(cells, "sections", ()) or ()))
    return ReferenceEmbedding(
        latent=latent,
        coords=cells.coords,
        pcs=pcs,
        in_sample=in_sample,
        names=cells.names,
        genes=model.genes,
        scale=model.scale_value(),
        section=None if section is None or not sections else np.asarray(section).astype(str),
        sections=sections if section is not None else (),
        calibration=calibration,
    )


# -------------------------------------------------------------------- AnnData in, coords out
#: Query rows read, matched to the model's genes and embedded per block by :func:`encode` (a
#: multiple of the embedding batch, so the batches are those of one whole-matrix pass).
ENCODE_BLOCK = 65_536


def _gene_columns(
    adata: ad.AnnData, genes: list[str], what: str = "the query"
) -> tuple[np.ndarray, np.ndarray, int]:
    """(query columns, their positions among ``genes``, number of genes missing)."""
    position = {g: i for i, g in enumerate(gene_names(adata.var_names, what))}
    src = np.array([position.get(str(g), -1) for g in genes], dtype=np.int64)
    present = src >= 0
    if not present.any():
        raise DataError(
            f"{what} shares no gene with the model's {len(genes)} genes (e.g. "
            f"{', '.join(map(str, list(genes)[:3]))}); check that both use the same gene ids"
        )
    return src[present], np.flatnonzero(present), int((~present).sum())


def _model_genes(block: Any, src: np.ndarray, dst: np.ndarray, n_genes: int) -> Any:
    """A row block of the query as CSR float32 over the model's genes (missing genes zero)."""
    import scipy.sparse as sp

    sub = sp.csr_matrix(block[:, src], dtype=np.float32)
    # columns keep their order (dst increases), so relabelling them is the scatter
    return sp.csr_matrix(
        (sub.data, dst[sub.indices].astype(sub.indices.dtype, copy=False), sub.indptr),
        shape=(sub.shape[0], n_genes),
    )


def encode(
    model: Parts,
    adata: ad.AnnData,
    layer: str | None = None,
    batch_size: int = 4096,
    allow_missing_genes: bool = False,
    block: int = ENCODE_BLOCK,
    what: str = "the query",
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Latent codes and expression PCs of ``adata``'s cells, genes matched to the model's by name.

    Missing genes are zero-filled with a warning that says how many; more than half of them
    missing is an error unless ``allow_missing_genes``. Values the model would log-transform or
    normalise must not be negative. Returns (latent, expression PCs or ``None``, number of
    missing genes).

    The matrix (in memory or backed) is read ``block`` rows at a time, each block matched to the
    model's genes and embedded into preallocated outputs, so memory does not grow with the
    number of cells beyond the outputs (and freed blocks go back to the system).

    Raises:
        DataError: no shared gene, too many missing, or negative values where counts belong.
    """
    from dpvae.io import get_matrix, iter_row_chunks
    from dpvae.neighbours import release_memory

    if adata.n_obs == 0:
        raise DataError(f"{what} has no cells; give a file with at least one cell")
    genes = model.genes
    src, dst, missing = _gene_columns(adata, genes, what)
    n_genes = len(genes)
    check_missing_genes(missing, n_genes, what, allow_missing_genes)
    pre = model.preprocessor
    counts_only = pre.normalize or pre.log1p
    matrix = get_matrix(adata, layer)
    n = adata.n_obs
    latent = np.empty((n, int(model.hparams["latent_dim"])), dtype=np.float32)
    n_pcs = model.transform.neighbour_pcs
    pcs = np.empty((n, n_pcs), dtype=np.float32) if n_pcs else None
    empty = np.zeros(n, dtype=bool)
    rows_per_block = batch_size * max(1, int(block) // batch_size)
    for rows, chunk in iter_row_chunks(matrix, rows_per_block):
        raw = _model_genes(chunk, src, dst, n_genes)
        del chunk
        low = float(raw.min()) if raw.nnz else 0.0
        if low < 0 and counts_only:
            raise DataError(
                f"the query holds negative values (min {low:g}) but the model was trained on "
                "counts it normalises and log-transforms; give the query's raw counts (layer=...)"
            )
        z, p = model.embed(raw, batch_size=batch_size, with_pcs=True)
        latent[rows] = z
        if pcs is not None and p is not None:
            pcs[rows] = p
        empty[rows] = np.asarray(raw.sum(axis=1)).ravel() == 0
        del raw, z, p
        release_memory()
    if empty.any():
        latent[empty] = np.nan
        if pcs is not None:
            pcs[empty] = np.nan
    return latent, pcs, missing


def resolve_reference(
    model: Parts,
    reference: str | Path | ad.AnnData | ReferenceEmbedding | None = None,
    spatial_key: str = "spatial",
    run_reference: ReferenceEmbedding | None = None,
) -> ReferenceEmbedding:
    """The reference cells to impute against.

    ``reference``: ``None`` for the ``embedding.h5ad`` beside the model's checkpoint (any way of
    loading a run records it), an embedding file or :class:`ReferenceEmbedding`, or an expression
    ``.h5ad``/AnnData with coordinates, whose cells the model embeds. Cells of an expression
    reference that are the run's own (``run_reference``, else the ``embedding.h5ad`` beside the
    checkpoint: the same names at the same positions with the same codes) keep the run's split, and the run's own
    radius calibration when they are all of its cells (:func:`with_run_record`); other cells
    are new to the model.
    """
    from dpvae.io import get_coordinates, read_h5ad

    if isinstance(reference, ReferenceEmbedding):
        return reference
    if reference is None:
        reference = _beside_checkpoint(model)
        if reference is None:
            raise DataError(
                "no reference cells: this model was not loaded from a run folder; pass "
                "reference=REF.h5ad (cells with coordinates) or load it with dpvae.load(RUN_DIR)"
            )
        if not reference.exists():
            raise DataError(
                f"{reference} not found next to the checkpoint; pass reference=REF.h5ad"
            )
    adata = reference if not isinstance(reference, str | Path) else read_h5ad(reference)
    if ReferenceEmbedding.is_embedding(adata):
        return ReferenceEmbedding.from_anndata(adata, model.hparams["latent_dim"])
    coords = get_coordinates(adata, spatial_key, option="spatial_key")
    dim = int(model.preprocessor.spatial_dim)
    if coords.shape[1] != dim:
        raise DataError(
            f"the reference's obsm['{spatial_key}'] has {coords.shape[1]} columns but the model "
            f"was trained on {dim}-D coordinates; give reference cells with {dim}-D coordinates"
        )
    latent, pcs, _ = encode(model, adata)
    keep = ~np.isnan(latent).any(axis=1) & np.isfinite(coords).all(axis=1)
    if not keep.any():
        raise DataError(
            "no reference cell has both expression of the model's genes and coordinates"
        )
    if not keep.all():
        warnings.warn(
            f"{int((~keep).sum())} reference cells have no expression of the model's genes or no "
            "finite coordinates; they are left out of the reference",
            DPVAEWarning,
            stacklevel=2,
        )
    fresh = ReferenceEmbedding(
        latent[keep],
        coords[keep],
        None if pcs is None else pcs[keep],
        names=np.asarray(adata.obs_names).astype(str)[keep],
        genes=model.genes,
        scale=model.scale_value(),
    )
    if run_reference is None:
        beside = _beside_checkpoint(model)
        if beside is not None and beside.exists():
            run_reference = ReferenceEmbedding.read(beside, model.hparams["latent_dim"])
    return with_run_record(fresh, run_reference)


def _beside_checkpoint(model: Parts) -> Path | None:
    """The run's ``embedding.h5ad`` path beside the model's checkpoint (``None``: the model was
    not loaded from a file)."""
    ckpt = getattr(model, "checkpoint_path", None)
    return Path(ckpt).parent / EMBEDDING_FILE if ckpt else None


def with_run_record(
    fresh: ReferenceEmbedding, run: ReferenceEmbedding | None
) -> ReferenceEmbedding:
    """``fresh`` (cells embedded at prediction) with what the run knows of the ones it trained on.

    A cell is the run's when ``run`` has a cell of its name at the same position with the same
    code (names and even positions repeat across sections: Visium barcodes). Matched cells take
    the run's split (``in_sample``; unmatched cells are new to the model, so out of sample); when
    every run cell is matched, the run's own radius calibration is kept too. Without a match ``fresh`` is returned as it is.
    """
    import pandas as pd

    if run is None or run.names is None or fresh.names is None or run.in_sample is None:
        return fresh
    index = pd.Index(np.asarray(run.names).astype(str))
    if not index.is_unique:
        return fresh
    pos = index.get_indexer(np.asarray(fresh.names).astype(str))
    found = pos >= 0
    if not found.any():
        return fresh
    same = np.zeros(len(fresh), dtype=bool)
    here, there = fresh.coords[found], run.coords[pos[found]]
    if here.shape[1] == there.shape[1] and fresh.latent.shape[1] == run.latent.shape[1]:
        tol = 1e-6 * max(float(np.abs(there).max()), 1.0)
        code = np.asarray(run.latent[pos[found]], dtype=np.float64)
        code_tol = 1e-4 * max(rms_spread(code), 1e-6)
        same[found] = (np.abs(here - there).max(axis=1) <= tol) & (
            np.abs(np.asarray(fresh.latent[found], dtype=np.float64) - code).max(axis=1) <= code_tol
        )
    if not same.any():
        return fresh
    in_sample = np.zeros(len(fresh), dtype=bool)
    in_sample[same] = np.asarray(run.in_sample, dtype=bool)[pos[same]]
    whole = int(same.sum()) == len(run) == len(fresh)
    return replace(fresh, in_sample=in_sample, calibration=run.calibration if whole else None)


@dataclass
class Prediction:
    """What :func:`predict` returns: coordinates, latent codes and a record of how."""

    coords: np.ndarray
    latent: np.ndarray
    info: dict[str, Any]
    #: (n,) each cell's calibrated radius (output units; see :func:`conformal_radius`), or
    #: ``None`` (reconstruct mode, or a reference too small to calibrate)
    radius: np.ndarray | None = None

    def write_to(self, adata: ad.AnnData) -> None:
        """Store in ``adata``: ``obsm['spatial_dpvae']``, ``obsm['X_dpvae']``,
        ``obs['dpvae_radius90']`` (when calibrated), ``uns['dpvae']`` (repeated cell names are made
        unique)."""
        if not adata.obs_names.is_unique:
            adata.obs_names_make_unique()
        adata.obsm["spatial_dpvae"] = self.coords
        adata.obsm["X_dpvae"] = self.latent
        if self.radius is not None:
            adata.obs[RADIUS_KEY] = self.radius
        adata.uns["dpvae"] = self.info

    def write_beside(self, source: str | Path, path: str | Path) -> Path:
        """Write ``source`` (the query's ``.h5ad``) plus this prediction to ``path`` atomically,
        without reading its matrices: the file is copied and the prediction's elements written
        into the copy (what :meth:`write_to` and ``write_h5ad`` give, for a query too large to
        hold in memory). ``source`` is never modified."""
        import shutil

        import h5py

        from dpvae.io import write_atomic

        try:
            from anndata.io import read_elem, write_elem
        except ImportError:  # anndata < 0.11
            from anndata.experimental import read_elem, write_elem  # type: ignore[no-redef]

        def write(tmp: Path) -> None:
            shutil.copyfile(source, tmp)
            with h5py.File(tmp, "r+") as f:
                for group in ("obsm", "uns"):
                    if group not in f:
                        write_elem(f, group, {})
                for key, value in (("spatial_dpvae", self.coords), ("X_dpvae", self.latent)):
                    if key in f["obsm"]:
                        del f["obsm"][key]
                    write_elem(f["obsm"], key, value)
                if "dpvae" in f["uns"]:
                    del f["uns"]["dpvae"]
                write_elem(f["uns"], "dpvae", self.info)
                obs = read_elem(f["obs"])
                if not obs.index.is_unique or self.radius is not None:
                    from anndata.utils import make_index_unique

                    if not obs.index.is_unique:
                        obs.index = make_index_unique(obs.index)
                    if self.radius is not None:
                        obs[RADIUS_KEY] = self.radius
                    del f["obs"]
                    write_elem(f, "obs", obs)

        return write_atomic(path, write)


def predict(
    model: Parts,
    query: ad.AnnData,
    mode: str = "impute",
    reference: str | Path | ad.AnnData | ReferenceEmbedding | None = None,
    k: int = NEIGHBOURS,
    spatial_key: str = "spatial",
    layer: str | None = None,
    n_iter: int = 0,
    expression_weight: float = EXPRESSION_WEIGHT,
    align_query: bool = False,
    seed: int = 0,
    allow_missing_genes: bool = False,
    reference_section: str | None = None,
    run_reference: ReferenceEmbedding | None = None,
    anchors: str | Path | ad.AnnData | None = None,
) -> Prediction:
    """Coordinates of the query's cells, in the reference's frame (impute) or up to rigid motion.

    ``mode=impute`` places each cell against the reference (:func:`resolve_reference`,
    :func:`place`); a reference of several sections lends the cells of one,
    ``reference_section`` (``None``: the first), whose frame the coordinates are in
    (:meth:`ReferenceEmbedding.select_section`); ``mode=reconstruct`` solves the query's own layout from its latent distances
    (classical MDS then SMACOF; landmarks above 3000 cells). When the query carries true
    coordinates under ``obsm[spatial_key]`` the benchmark's scores are added to ``info['scores']``
    (impute scores, or the rotation-invariant transfer scores for reconstruct).

    ``anchors`` (impute only): cells of the query's own section with known positions; the query
    is placed through the reference into the anchors' frame (:func:`dpvae.anchors.place_through`:
    query and anchors placed in the reference's frame as one new section, then carried by the
    motion fitted to the anchors), and its radius is calibrated on the anchors.
    """
    from dpvae.solver import reconstruct

    check_options(mode, k, n_iter, expression_weight, anchors is not None)
    if query.n_obs == 0:
        raise DataError("the query has no cells; give a file with at least one cell")
    if not query.obs_names.is_unique:
        repeated = query.n_obs - query.obs_names.nunique()
        warnings.warn(
            f"{repeated} query cell names are repeated; the output makes them unique",
            DPVAEWarning,
            stacklevel=2,
        )
    pre = model.preprocessor
    in_sample = 0
    radius: np.ndarray | None = None
    calibration: dict[str, Any] | None = None
    section: str | None = None
    n_sections = 0
    if mode == "impute":
        whole = resolve_reference(model, reference, spatial_key, run_reference)
        n_sections = len(whole.sections) if whole.section is not None else 0
        ref, section = whole.select_section(reference_section)
        if k > len(ref):
            warnings.warn(
                f"k={k} is more than the {len(ref)} reference cells; using {len(ref)}",
                DPVAEWarning,
                stacklevel=2,
            )
        if whole.names is not None and whole.in_sample is not None:
            overlap = int(np.isin(np.asarray(query.obs_names).astype(str), whole.names).sum())
            in_sample = overlap
            if overlap:
                warnings.warn(
                    f"{overlap} of the {query.n_obs} query cells are reference cells of this run "
                    "(same names): their placements and scores are in-sample, not held out",
                    DPVAEWarning,
                    stacklevel=2,
                )
        del whole
    # the anchors' record, and the cell spacing radii and scores are told in (the output frame's):
    # the run's for its own cells, else that of the cells given as the reference (their units)
    through, spacing = None, pre.ref_nn_distance
    if mode == "impute" and ref.in_sample is None:
        spacing = own_spacing(ref, spacing)
    if mode == "impute" and anchors is not None:
        from dpvae.anchors import place_through
        from dpvae.io import read_h5ad

        coords, latent, radius, through = place_through(
            model,
            query,
            read_h5ad(anchors) if isinstance(anchors, str | Path) else anchors,
            ref,
            k=k,
            expression_weight=expression_weight,
            spatial_key=spatial_key,
            layer=layer,
            seed=seed,
            allow_missing_genes=allow_missing_genes,
        )
        empty = np.isnan(latent).any(axis=1)
        calibration = through.pop("calibration", None)
        if calibration is None:
            radius = None
        spacing = through["cell_spacing"]  # the reference's, in the anchors' frame
    elif mode == "impute":
        latent, pcs, _ = encode(model, query, layer, allow_missing_genes=allow_missing_genes)
        empty = np.isnan(latent).any(axis=1)
        std = np.full((len(latent), pre.spatial_dim), np.nan)
        calibration = None
        if n_iter == 0:
            calibration = conformal_radius(
                model, ref, k=k, expression_weight=expression_weight, seed=seed, spacing=spacing
            )
        else:
            _no_radius(
                f"n_iter={n_iter}: the radius is calibrated for the neighbour mean's placements "
                "(n_iter=0), not for stress majorisation's"
            )
        radius = np.full(len(latent), np.nan) if calibration is not None else None
        if (~empty).any():
            spread = torch.empty(int((~empty).sum()), dtype=torch.float64)
            placed = place_against(
                model,
                ref,
                latent[~empty],
                None if pcs is None else pcs[~empty],
                k=k,
                n_iter=n_iter,
                expression_weight=expression_weight,
                align_query=align_query,
                spread=spread,
            )
            std[~empty] = placed.cpu().numpy()
            if radius is not None and calibration is not None:
                difficulty = spread.numpy() + calibration["floor"]
                radius[~empty] = calibration["quantile"] * difficulty * pre.coord_scale
        coords = pre.coords_from_model(std)
    else:
        latent, _, _ = encode(model, query, layer, allow_missing_genes=allow_missing_genes)
        empty = np.isnan(latent).any(axis=1)
        if int((~empty).sum()) < 3:
            raise DataError(
                "reconstruct needs at least 3 query cells with expression; use mode=impute"
            )
        coords = np.full((len(latent), pre.spatial_dim), np.nan)
        layout = reconstruct(
            torch.as_tensor(latent[~empty], dtype=torch.float64),
            pre.spatial_dim,
            model.scale_value(),
            seed=seed,
        )
        coords[~empty] = layout.numpy() * pre.coord_scale
    if empty.any():
        warnings.warn(
            f"{int(empty.sum())} query cells have no expression of the model's genes; their "
            "coordinates are NaN and they are left out of the scores",
            DPVAEWarning,
            stacklevel=2,
        )
    shared = set(gene_names(query.var_names, warn=False))  # as the genes were matched
    info: dict[str, Any] = {
        "checkpoint": str(getattr(model, "checkpoint_path", "") or ""),
        "mode": mode,
        "genes": model.genes,
        "n_genes_missing": int(sum(g not in shared for g in model.genes)),
        "lambda": model.scale_value(),
        "n_cells_without_expression": int(empty.sum()),
        "n_cells_in_sample": in_sample,  # query cells that are the run's own reference cells
    }
    if calibration is not None and radius is not None:
        finite_r = radius[np.isfinite(radius)]
        median = float(np.median(finite_r)) if len(finite_r) else float("nan")
        info["radius"] = {
            **calibration,
            "obs_key": RADIUS_KEY,
            "median": median,
            "median_cell_spacings": median / spacing if spacing > 0 else float("nan"),
        }
        level = float(calibration.get("level", RADIUS_COVERAGE))
        if level < RADIUS_COVERAGE:
            warnings.warn(
                f"{RADIUS_KEY} is calibrated on {calibration.get('n_calibration')} cells: it "
                f"holds a cell's true position with probability {level:.2f} or more, not "
                f"{RADIUS_COVERAGE} (9 or more calibration cells give {RADIUS_COVERAGE})",
                DPVAEWarning,
                stacklevel=2,
            )
    if through is not None:
        info["anchors"] = through
    if section is not None and n_sections > 1:
        info["reference_section"] = section
        info["n_reference_sections"] = n_sections
    if spatial_key in query.obsm and len(coords) >= 3:
        from dpvae.io import get_coordinates
        from dpvae.metrics import radius_scores, score_coordinates  # scipy.stats: 0.5-0.8 s

        truth = get_coordinates(query, spatial_key, option="spatial_key")
        finite = np.all(np.isfinite(truth), axis=1) & ~empty
        if truth.shape[1] != coords.shape[1]:
            warnings.warn(
                f"the query's obsm['{spatial_key}'] has {truth.shape[1]} columns, the placements "
                f"{coords.shape[1]}: no scores against them",
                DPVAEWarning,
                stacklevel=2,
            )
        elif finite.sum() >= 3:
            task = "impute" if mode == "impute" else "transfer"
            nn = spacing if task == "impute" else None
            info["scores"] = score_coordinates(coords[finite], truth[finite], task, nn)
            if radius is not None:
                info["scores"].update(radius_scores(coords[finite], truth[finite], radius[finite]))
    elif spatial_key != "spatial" and spatial_key not in query.obsm:  # a key given, not found
        have = ", ".join(sorted(query.obsm.keys())) or "none"
        warnings.warn(
            f"the query has no obsm['{spatial_key}'] (obsm keys: {have}): placed and not scored",
            DPVAEWarning,
            stacklevel=2,
        )
    return Prediction(coords, latent, info, radius)
