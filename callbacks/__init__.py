"""Lightning callbacks for dpvae training."""

from __future__ import annotations

from callbacks.spatial_validation import SpatialValidation

__all__ = ["SpatialValidation"]
