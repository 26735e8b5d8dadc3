"""The dp-VAE regularizer of the original method."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from dpvae.errors import check_scale_options
from dpvae.regularizers.base import ScaledDistanceRegularizer, pair_distances, weighted_mean


class DPRegularizer(ScaledDistanceRegularizer):
    """Mean absolute gap between latent and scaled spatial distance over sampled pairs.

    ``loss = sum_{(i,j)} p_ij w_ij | ||z_i - z_j|| - lambda * d_ij | / sum p_ij w_ij`` with lambda
    learned in log space and clamped (options of :class:`ScaledDistanceRegularizer`); ``p_ij`` is
    the pair's weight in the batch's pair set (1 without one). With ``relative=0`` (the original
    dp-VAE) ``w_ij = 1``; with ``relative=r`` in (0, 1] the gap is measured relative to the pair's
    distance, ``w_ij = (mean d / d_ij)^r``, so short distances, the ones local neighbourhoods
    depend on, weigh as much as long ones (r = 1 bounds the relative gap that the bi-Lipschitz
    argument needs).

    Args:
        relative: exponent r of the relative weighting (0: the plain absolute gap).
        **kwargs: options of :class:`ScaledDistanceRegularizer`.
    """

    def __init__(self, relative: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_scale_options(relative=relative)
        self.relative = relative

    def forward(
        self, z: Tensor, coords: Tensor, pairs: Tensor, weight: Tensor | None = None
    ) -> Tensor:
        dz, d = pair_distances(z, coords, pairs)
        gap = (dz - self.scale() * d).abs()
        if self.relative == 0:
            return weighted_mean(gap, weight)
        w = (d.mean() / d.clamp_min(1e-6 * d.mean())).pow(self.relative)
        return weighted_mean(gap, w if weight is None else w * weight)
