"""Count distributions parameterised by mean and inverse dispersion, as torch distributions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Distribution, constraints


def _nb_log_prob(x: Tensor, mu: Tensor, theta: Tensor, eps: float = 1e-8) -> Tensor:
    log_theta_mu = torch.log(theta + mu + eps)
    return (
        theta * (torch.log(theta + eps) - log_theta_mu)
        + x * (torch.log(mu + eps) - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1.0)
    )


class NegativeBinomial(Distribution):
    """Negative binomial with mean ``mu`` and inverse dispersion ``theta``.

    Variance is ``mu + mu**2 / theta``. Equivalent to ``scipy.stats.nbinom(n=theta,
    p=theta / (theta + mu))``.
    """

    arg_constraints = {"mu": constraints.nonnegative, "theta": constraints.positive}
    support = constraints.nonnegative_integer

    def __init__(self, mu: Tensor, theta: Tensor, validate_args: bool | None = False) -> None:
        self.mu, self.theta = torch.broadcast_tensors(mu, theta)
        super().__init__(batch_shape=self.mu.shape, validate_args=validate_args)

    @property
    def mean(self) -> Tensor:
        return self.mu

    @property
    def variance(self) -> Tensor:
        return self.mu + self.mu**2 / self.theta

    def log_prob(self, value: Tensor) -> Tensor:
        return _nb_log_prob(value, self.mu, self.theta)


class ZeroInflatedNegativeBinomial(NegativeBinomial):
    """Negative binomial mixed with a point mass at zero of probability ``sigmoid(zi_logits)``."""

    arg_constraints = {
        "mu": constraints.nonnegative,
        "theta": constraints.positive,
        "zi_logits": constraints.real,
    }

    def __init__(
        self, mu: Tensor, theta: Tensor, zi_logits: Tensor, validate_args: bool | None = False
    ) -> None:
        super().__init__(mu, theta, validate_args=validate_args)
        self.zi_logits = zi_logits.expand_as(self.mu)

    @property
    def mean(self) -> Tensor:
        return torch.sigmoid(-self.zi_logits) * self.mu

    def log_prob(self, value: Tensor) -> Tensor:
        log_pi = -F.softplus(-self.zi_logits)  # log sigmoid(logits)
        log_not_pi = -F.softplus(self.zi_logits)  # log (1 - sigmoid(logits))
        nb = _nb_log_prob(value, self.mu, self.theta)
        zero = torch.logaddexp(log_pi, log_not_pi + nb)
        return torch.where(value < 0.5, zero, log_not_pi + nb)
