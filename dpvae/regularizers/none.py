"""No distance term: a plain VAE."""

from __future__ import annotations

from torch import Tensor

from dpvae.regularizers.base import DistanceRegularizer


class NoRegularizer(DistanceRegularizer):
    """Always zero (keeps the autograd graph intact): trains a plain VAE."""

    def forward(
        self, z: Tensor, coords: Tensor, pairs: Tensor, weight: Tensor | None = None
    ) -> Tensor:
        return z.sum() * 0.0
