"""Distance-preserving regularizers. See :class:`DistanceRegularizer` for the contract.

A custom regularizer is a subclass of :class:`DistanceRegularizer` (or
:class:`ScaledDistanceRegularizer` when it learns the latent-per-spatial scale lambda) in any
importable module, plus one YAML file naming it with ``_target_``; nothing is registered.
"""

from __future__ import annotations

from dpvae.regularizers.base import (
    DistanceRegularizer,
    ScaledDistanceRegularizer,
    accepts_weight,
    pair_distances,
    weighted_mean,
)
from dpvae.regularizers.dp import DPRegularizer
from dpvae.regularizers.none import NoRegularizer
from dpvae.regularizers.stress import StressRegularizer

__all__ = [
    "DPRegularizer",
    "DistanceRegularizer",
    "NoRegularizer",
    "ScaledDistanceRegularizer",
    "StressRegularizer",
    "accepts_weight",
    "pair_distances",
    "weighted_mean",
]
