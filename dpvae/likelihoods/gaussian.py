"""Gaussian likelihood on the model's transformed (normalised, log, scaled) expression."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dpvae.likelihoods.base import Likelihood


class GaussianLikelihood(Likelihood):
    """Independent Gaussians per gene on the transformed input, with a learned per-gene variance.

    Args:
        n_genes: number of genes.
        learn_variance: learn one log-standard-deviation per gene (else fixed at ``init_log_std``).
        init_log_std: initial log standard deviation.
        min_log_std: lower clamp of the log standard deviation.
    """

    n_params = 1
    requires_counts = False

    def __init__(
        self,
        n_genes: int,
        learn_variance: bool = True,
        init_log_std: float = 0.0,
        min_log_std: float = -4.0,
    ) -> None:
        super().__init__(n_genes)
        self.log_std = nn.Parameter(
            torch.full((n_genes,), float(init_log_std)), requires_grad=learn_variance
        )
        self.min_log_std = min_log_std

    def nll(self, decoded: Tensor, target: Tensor, library: Tensor) -> Tensor:
        log_std = self.log_std.clamp_min(self.min_log_std)
        z = (target - decoded) * torch.exp(-log_std)
        # the sums into the product's own tensor (their backward saves nothing): the same values
        per_gene = (0.5 * z * z).add_(log_std).add_(0.5 * math.log(2 * math.pi))
        return per_gene.sum(dim=-1)
