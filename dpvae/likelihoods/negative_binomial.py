"""Negative binomial and zero-inflated negative binomial likelihoods on raw counts."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dpvae.likelihoods.base import Likelihood
from dpvae.likelihoods.distributions import NegativeBinomial, ZeroInflatedNegativeBinomial


class NBLikelihood(Likelihood):
    """Negative binomial on raw counts, with the library size.

    The decoder gives per-gene logits; their softmax over genes times the cell's library size is the
    mean, so the model explains composition and the library explains depth. Each gene has a learned
    inverse dispersion ``theta``.

    Args:
        n_genes: number of genes.
        init_log_theta: initial log inverse dispersion.
    """

    n_params = 1
    requires_counts = True

    def __init__(self, n_genes: int, init_log_theta: float = 0.0) -> None:
        super().__init__(n_genes)
        self.log_theta = nn.Parameter(torch.full((n_genes,), float(init_log_theta)))

    def distribution(self, decoded: Tensor, library: Tensor) -> NegativeBinomial:
        """The predicted distribution of every (cell, gene) count."""
        (logits,) = self.split(decoded)[:1]
        mu = torch.softmax(logits, dim=-1) * library
        return NegativeBinomial(mu, torch.exp(self.log_theta.clamp(-10.0, 10.0)))

    def nll(self, decoded: Tensor, target: Tensor, library: Tensor) -> Tensor:
        return -self.distribution(decoded, library).log_prob(target).sum(dim=-1)


class ZINBLikelihood(NBLikelihood):
    """Zero-inflated negative binomial: :class:`NBLikelihood` plus a per-(cell, gene) dropout
    probability that the decoder also predicts (``n_params = 2``)."""

    n_params = 2

    def distribution(self, decoded: Tensor, library: Tensor) -> ZeroInflatedNegativeBinomial:
        logits, zi_logits = self.split(decoded)
        mu = torch.softmax(logits, dim=-1) * library
        theta = torch.exp(self.log_theta.clamp(-10.0, 10.0))
        return ZeroInflatedNegativeBinomial(mu, theta, zi_logits)
