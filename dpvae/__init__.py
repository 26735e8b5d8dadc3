"""dpvae: distance-preserving variational autoencoders for spatial single-cell data.

The maths lives here: encoders, decoders, likelihoods, distance regularizers, the
LightningModule that composes them, preprocessing that a model repeats at prediction time,
the coordinate solver and the metrics. ``datamodules`` and ``callbacks`` (top-level
packages) build on it; this package imports neither.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
