"""Gaussian likelihood on the model's transformed (normalised, log, scaled) expression."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from dpvae.likelihoods.base import Likelihood

#: the per-gene constant of the Gaussian log-density, 0.5 log(2 pi)
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _mv(matrix: Tensor, vector: Tensor) -> Tensor:
    """``matrix @ vector`` in their own precision, outside any autocast region (a sum over
    thousands of genes in half precision would lose digits)."""
    with torch.autocast(device_type=matrix.device.type, enabled=False):
        return torch.mv(matrix, vector)


class _GaussianNLL(torch.autograd.Function):
    """Each row's ``sum_g 0.5 (t - d)^2 exp(-2 s_g) + s_g + 0.5 log(2 pi)``, and its gradients.

    Written out, the expression costs about fourteen passes over the (B, G) batch between the
    forward pass and autograd's backward of it (a product, its square, the sums, and each one's
    gradient); here three each way: the residual, its square, their weighted sums, and in
    backward ``-g r w`` for the means and ``sum g - w (g @ r^2)`` for the log standard
    deviations. The same values to float rounding (``tests/test_likelihoods.py``)."""

    @staticmethod
    def forward(ctx: Any, decoded: Tensor, target: Tensor, log_std: Tensor) -> Tensor:
        residual = target - decoded
        dtype = torch.promote_types(residual.dtype, log_std.dtype)
        residual = residual.to(dtype)
        weight = torch.exp(-2.0 * log_std.to(dtype))
        square = residual * residual
        offset = log_std.sum() + HALF_LOG_2PI * log_std.numel()
        ctx.save_for_backward(residual, square, weight)
        return _mv(square, weight).mul_(0.5).add_(offset)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        residual, square, weight = ctx.saved_tensors
        grad_decoded = grad_target = grad_log_std = None
        if ctx.needs_input_grad[0]:
            grad_decoded = (residual * weight).mul_(-grad.unsqueeze(-1))
        if ctx.needs_input_grad[1]:  # a target with a graph (a transformed input requiring grad)
            if grad_decoded is not None:
                grad_target = -grad_decoded
            else:
                grad_target = (residual * weight).mul_(grad.unsqueeze(-1))
        if ctx.needs_input_grad[2]:
            grad_log_std = grad.sum() - weight * _mv(square.t(), grad)
        return grad_decoded, grad_target, grad_log_std


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
        decoded, target = torch.broadcast_tensors(decoded, target)
        rows = decoded.reshape(-1, decoded.shape[-1])
        out = _GaussianNLL.apply(rows, target.reshape(rows.shape), log_std)
        return out.reshape(decoded.shape[:-1])
