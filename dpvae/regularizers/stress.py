"""Squared-stress regularizer."""

from __future__ import annotations

from torch import Tensor

from dpvae.regularizers.base import ScaledDistanceRegularizer, pair_distances


class StressRegularizer(ScaledDistanceRegularizer):
    """Normalised squared stress between latent and scaled spatial distances.

    ``loss = sum (||z_i - z_j|| - lambda d_ij)^2 / sum (lambda d_ij)^2`` over the sampled pairs:
    Kruskal's stress (squared), normalised by the sum of the squared target distances so that it
    does not shrink by shrinking the embedding and lambda together.
    """

    def forward(self, z: Tensor, coords: Tensor, pairs: Tensor) -> Tensor:
        dz, d = pair_distances(z, coords, pairs)
        target = self.scale() * d
        return ((dz - target) ** 2).sum() / (target**2).sum().clamp_min(1e-12)
