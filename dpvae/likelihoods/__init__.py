"""Likelihoods of expression given the decoder's output. See :class:`Likelihood` for the contract."""

from __future__ import annotations

from dpvae.likelihoods.base import Likelihood
from dpvae.likelihoods.distributions import NegativeBinomial, ZeroInflatedNegativeBinomial
from dpvae.likelihoods.gaussian import GaussianLikelihood
from dpvae.likelihoods.negative_binomial import NBLikelihood, ZINBLikelihood

__all__ = [
    "GaussianLikelihood",
    "Likelihood",
    "NBLikelihood",
    "NegativeBinomial",
    "ZINBLikelihood",
    "ZeroInflatedNegativeBinomial",
]
