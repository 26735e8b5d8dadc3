"""The dp-VAE regularizer of the original method."""

from __future__ import annotations

from torch import Tensor

from dpvae.regularizers.base import ScaledDistanceRegularizer, pair_distances


class DPRegularizer(ScaledDistanceRegularizer):
    """Mean absolute gap between latent and scaled spatial distance over sampled pairs.

    ``loss = mean_{(i,j)} | ||z_i - z_j|| - lambda * d_ij |`` with lambda learned in log space and
    clamped (options of :class:`ScaledDistanceRegularizer`).
    """

    def forward(self, z: Tensor, coords: Tensor, pairs: Tensor) -> Tensor:
        dz, d = pair_distances(z, coords, pairs)
        return (dz - self.scale() * d).abs().mean()
