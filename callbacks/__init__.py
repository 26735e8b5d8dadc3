"""Lightning callbacks for dpvae training."""

from __future__ import annotations

from callbacks.best_weights import BestWeights
from callbacks.early_stopping import WarmupEarlyStopping
from callbacks.spatial_validation import SpatialValidation

__all__ = ["BestWeights", "SpatialValidation", "WarmupEarlyStopping"]
