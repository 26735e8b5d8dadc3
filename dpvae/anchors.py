"""Placement through the reference into a new section's frame, carried there by anchor cells.

A model trained on section A places a new section B's cells in A's frame; a few of B's cells of
known position (anchors) then give the rigid motion from A's frame to B's. Placed against A's
many cells rather than against the anchors alone, each cell gets A's fine neighbourhoods: on the
breast arrays at 5% anchors (13 cells) this scored 0.47 dist_pearson against 0.38 for the anchors
as the reference, on DLPFC about the same as them. :func:`place_through` does it, and its folds
over the anchors (each fold's motion fitted on the others) measure the route's error, calibrate
the 90% radius and let fine-tuning compare it with its own anchors (:mod:`dpvae.finetune`).

The motion is orthogonal Procrustes (:func:`scipy.linalg.orthogonal_procrustes`, rotations and
reflections: a section may be mounted mirrored) with translation; a uniform scale only where the
anchors' frame is in other units (their spread over their placements' outside [1/2, 2]).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dpvae.errors import DataError, DPVAEWarning

if TYPE_CHECKING:
    import anndata as ad

    from dpvae.network import Parts
    from dpvae.placement import ReferenceEmbedding

#: a spread ratio within [1 / SAME_UNITS, SAME_UNITS] means the same units: a rigid motion
SAME_UNITS = 2.0
#: folds over the anchors that measure the route's error and calibrate its radius
ANCHOR_FOLDS = 5
#: the fewest anchors a motion is fitted to
MIN_ANCHORS = 3


@dataclass
class Motion:
    """``x -> scale * (x - source_centre) @ rotation + target_centre``."""

    source_centre: np.ndarray
    target_centre: np.ndarray
    rotation: np.ndarray
    scale: float = 1.0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.scale * (x - self.source_centre) @ self.rotation + self.target_centre


def fit_motion(source: np.ndarray, target: np.ndarray, scale: bool | None = None) -> Motion:
    """The rotation (or reflection) and translation, and with ``scale`` a uniform scale, that
    best map the rows of ``source`` onto those of ``target`` (least squares for the rotation).

    The scale is the ratio of the two point sets' RMS spreads about their centres, not the least
    squares one, which shrinks towards 0 as the correspondence gets noisier (0.41 on 13 breast
    anchors in the same units). ``scale=None``: scaled only where that ratio is outside
    [1/:data:`SAME_UNITS`, :data:`SAME_UNITS`], i.e. the anchors' frame is in other units.
    """
    from scipy.linalg import orthogonal_procrustes

    sc, tc = source.mean(axis=0), target.mean(axis=0)
    a, b = source - sc, target - tc
    rotation, _ = orthogonal_procrustes(a, b)
    spread_a, spread_b = float(np.sqrt((a**2).sum())), float(np.sqrt((b**2).sum()))
    ratio = spread_b / spread_a if spread_a > 0 else 1.0
    if scale is None:
        scale = not (1.0 / SAME_UNITS <= ratio <= SAME_UNITS)
    return Motion(sc, tc, rotation, ratio if scale else 1.0)


@dataclass
class Route:
    """The anchors placed in the reference's frame and what folds over them found.

    Attributes:
        motion: the motion fitted to every anchor (reference frame -> anchors' frame).
        errors: each anchor's error when its fold's motion (fitted on the other folds) carries
            its placement, in the anchors' units (NaN: an anchor without expression).
        held_out: each anchor's position so carried (NaN where no fold's motion could).
        difficulty: each anchor's neighbour spread in the anchors' units (before the floor).
        floor: the difficulty's floor in the anchors' units.
        folds: the folds fitted (0: too few anchors to fold).
    """

    motion: Motion
    errors: np.ndarray
    held_out: np.ndarray
    difficulty: np.ndarray
    floor: float
    folds: int

    def mean_error(self) -> float:
        finite = self.errors[np.isfinite(self.errors)]
        return float(finite.mean()) if len(finite) else float("inf")


def anchor_folds(n: int, seed: int, folds: int = ANCHOR_FOLDS) -> np.ndarray:
    """Each of ``n`` anchors' fold: ``default_rng(seed).permutation(n) % folds`` (the deal of
    fine-tuning's cross-validation, so that both score the same held-out cells)."""
    return np.random.default_rng(seed).permutation(n) % folds


def route_from_placements(
    placed: np.ndarray,
    spread: np.ndarray,
    truth: np.ndarray,
    spacing: float,
    fold: np.ndarray | None,
) -> Route:
    """A :class:`Route` from the anchors' placements in the reference's frame (``placed``,
    NaN rows for anchors without expression), their neighbour spreads and the reference's cell
    spacing (the difficulty's floor is ``SPREAD_FLOOR`` of it; both in the reference's units),
    their true positions and their folds (``None``: no folds)."""
    from dpvae.placement import SPREAD_FLOOR

    floor = SPREAD_FLOOR * spacing
    ok = np.isfinite(placed).all(axis=1) & np.isfinite(truth).all(axis=1)
    if int(ok.sum()) < MIN_ANCHORS:
        raise DataError(
            f"placing through the reference needs at least {MIN_ANCHORS} anchor cells with "
            f"expression of the model's genes and coordinates, got {int(ok.sum())}; give more "
            "anchors"
        )
    if not np.ptp(truth[ok], axis=0).any():
        raise DataError(
            "the anchors all share one position: no motion can be fitted to them; give "
            "anchors at their own coordinates"
        )
    motion = fit_motion(placed[ok], truth[ok])
    held_out = np.full(placed.shape, np.nan)
    n_folds = 0
    if fold is not None:
        for f in np.unique(fold):
            held, fit = ok & (fold == f), ok & (fold != f)
            if not held.any() or int(fit.sum()) < MIN_ANCHORS:
                continue
            part = fit_motion(placed[fit], truth[fit], scale=motion.scale != 1.0)
            held_out[held] = part(placed[held])
            n_folds += 1
    errors = np.linalg.norm(held_out - truth, axis=1)
    return Route(motion, errors, held_out, spread * motion.scale, floor * motion.scale, n_folds)


def cell_spacing(model: Parts, reference: ReferenceEmbedding) -> float:
    """The reference cells' median nearest-neighbour distance, in their units (a fine-tuned
    model's own frame is its anchors', far sparser than the reference it places through)."""
    from dpvae.metrics import median_nn_distance

    if len(reference) < 2:
        return float(model.preprocessor.ref_nn_distance)
    return median_nn_distance(reference.coords)


def route_over_cells(
    model: Parts,
    reference: ReferenceEmbedding,
    raw: Any,
    coords: np.ndarray,
    fold: np.ndarray,
    *,
    k: int,
    expression_weight: float,
) -> Route:
    """The route through ``reference`` for cells of known position given as expression rows on
    the model's genes (``raw``, a datamodule's cells: fine-tuning's), their codes centred as one
    batch, with the folds ``fold``."""
    latent, pcs = model.embed(raw, with_pcs=True)
    ref, _ = reference.select_section(None)
    placed, spread = _in_reference_frame(model, ref, latent, pcs, k, expression_weight)
    return route_from_placements(placed, spread, coords, cell_spacing(model, ref), fold)


def _in_reference_frame(
    model: Parts,
    ref: ReferenceEmbedding,
    latent: np.ndarray,
    pcs: np.ndarray | None,
    k: int,
    expression_weight: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Cells (latent codes, expression PCs) of one new section placed in the reference's frame,
    their codes centred on the reference's (``align_query``): ``(coordinates, spread)`` in the
    reference's original units, NaN for cells without expression."""
    from dpvae.placement import place_against

    pre = model.preprocessor
    coords = np.full((len(latent), pre.spatial_dim), np.nan)
    spread = np.full(len(latent), np.nan)
    ok = ~np.isnan(latent).any(axis=1)
    if ok.any():
        out = torch.empty(int(ok.sum()), dtype=torch.float64)
        placed = place_against(
            model,
            ref,
            latent[ok],
            None if pcs is None else pcs[ok],
            k=k,
            expression_weight=expression_weight,
            align_query=True,
            spread=out,
        )
        coords[ok] = pre.coords_from_model(placed.cpu().numpy())
        spread[ok] = out.numpy() * pre.coord_scale
    return coords, spread


def place_through(
    model: Parts,
    query: ad.AnnData,
    anchors: ad.AnnData,
    reference: ReferenceEmbedding,
    *,
    k: int,
    expression_weight: float,
    spatial_key: str = "spatial",
    layer: str | None = None,
    seed: int = 0,
    allow_missing_genes: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """The query's cells in the anchors' frame, placed through ``reference`` (one section).

    Anchors and query, one new section, are placed together in the reference's frame (their
    codes centred on the reference's as one batch); the motion fitted to the anchors carries the
    query into theirs. Returns ``(coordinates, latent, radius, record)``: the radius (NaN
    without folds) is the conformal 90% quantile of the held-out anchors' error over their
    difficulty (neighbour spread plus the floor), times each cell's difficulty; the record goes
    to ``uns['dpvae']['anchors']`` and ``['radius']``.
    """
    from dpvae.io import get_coordinates
    from dpvae.placement import MIN_CALIBRATION, encode, radius_record

    pre = model.preprocessor
    truth = get_coordinates(anchors, spatial_key, option="spatial_key")
    if truth.shape[1] != pre.spatial_dim:
        raise DataError(
            f"the anchors' obsm['{spatial_key}'] has {truth.shape[1]} columns, the model's "
            f"reference {pre.spatial_dim}; give anchors of the same dimension"
        )
    a_latent, a_pcs, _ = encode(
        model, anchors, layer, allow_missing_genes=allow_missing_genes, what="the anchors file"
    )
    q_latent, q_pcs, _ = encode(model, query, layer, allow_missing_genes=allow_missing_genes)
    n_a = len(a_latent)
    both_pcs = None if a_pcs is None or q_pcs is None else np.concatenate([a_pcs, q_pcs])
    coords, spread = _in_reference_frame(
        model, reference, np.concatenate([a_latent, q_latent]), both_pcs, k, expression_weight
    )
    spacing = cell_spacing(model, reference)
    fold = anchor_folds(n_a, seed, min(ANCHOR_FOLDS, n_a)) if n_a > MIN_ANCHORS else None
    route = route_from_placements(coords[:n_a], spread[:n_a], truth, spacing, fold)
    placed = route.motion(coords[n_a:])
    difficulty = spread[n_a:] * route.motion.scale + route.floor
    scores = route.errors / (route.difficulty + route.floor)
    scores = scores[np.isfinite(scores)]
    radius = np.full(len(placed), np.nan)
    calibration = None
    if len(scores) >= MIN_CALIBRATION:
        calibration = radius_record(
            scores,
            route.floor,
            f"the {n_a} anchors, each carried by the motion fitted to the other folds' anchors "
            f"({route.folds} folds)",
            k,
            expression_weight,
        )
        radius = calibration["quantile"] * difficulty
    elif n_a:
        warnings.warn(
            f"{n_a} anchors are too few to calibrate a radius ({MIN_CALIBRATION} or more with "
            "expression and folds); dpvae_radius90 is NaN",
            DPVAEWarning,
            stacklevel=3,
        )
    record = {
        "n_anchors": n_a,
        "through": "the reference's frame, then the motion fitted to the anchors",
        "scale": float(route.motion.scale),
        "rotation": route.motion.rotation.tolist(),
        "held_out_mean_error": route.mean_error(),
        "folds": route.folds,
        "cell_spacing": spacing * route.motion.scale,  # the reference's, in the anchors' units
    }
    if calibration is not None:
        record["calibration"] = calibration
    return placed, q_latent, radius, record
