"""Squared-stress regularizer."""

from __future__ import annotations

from torch import Tensor

from dpvae.regularizers.base import ScaledDistanceRegularizer, pair_distances


class StressRegularizer(ScaledDistanceRegularizer):
    """Normalised squared stress between latent and scaled spatial distances.

    ``loss = sum p_ij (||z_i - z_j|| - lambda d_ij)^2 / sum p_ij (lambda d_ij)^2`` over the sampled
    pairs (``p_ij``: the pair's weight in the batch's pair set, 1 without one): Kruskal's stress
    (squared), normalised by the sum of the squared target distances so that it does not shrink by
    shrinking the embedding and lambda together.
    """

    def forward(
        self, z: Tensor, coords: Tensor, pairs: Tensor, weight: Tensor | None = None
    ) -> Tensor:
        dz, d = pair_distances(z, coords, pairs)
        target = self.scale() * d
        sq, norm = (dz - target) ** 2, target**2
        if weight is not None:
            sq, norm = sq * weight, norm * weight
        return sq.sum() / norm.sum().clamp_min(1e-12)
