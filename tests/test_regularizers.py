"""Regularizers: zero on an exactly scaled copy, growing with distortion; the scale reset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpvae.config import instantiate
from dpvae.module import batch_pairs
from dpvae.regularizers import DPRegularizer, NoRegularizer, StressRegularizer

torch.manual_seed(0)


def _scaled_copy(coords: torch.Tensor, lam: float, latent_dim: int) -> torch.Tensor:
    """Embed coordinates isometrically (times lam) into a higher-dimensional latent space."""
    q, _ = torch.linalg.qr(torch.randn(latent_dim, latent_dim, dtype=torch.float64))
    basis = q[: coords.shape[1]]
    return lam * coords @ basis + torch.randn(latent_dim, dtype=torch.float64)


@pytest.mark.parametrize("cls", [DPRegularizer, StressRegularizer])
@pytest.mark.parametrize("dim", [2, 3])
def test_zero_for_scaled_copy_and_grows_with_distortion(cls: type, dim: int) -> None:
    coords = torch.randn(64, dim, dtype=torch.float64)
    pairs = batch_pairs(coords)
    reg = cls().double()
    reg.reset_scale(2.5)
    z = _scaled_copy(coords, 2.5, latent_dim=8)
    assert reg(z, coords, pairs).item() == pytest.approx(0.0, abs=1e-4)
    losses = []
    for noise in (0.05, 0.2, 0.8):
        distorted = z + noise * torch.randn_like(z)
        losses.append(reg(distorted, coords, pairs).item())
    assert 0 < losses[0] < losses[1] < losses[2]
    # the wrong scale is penalised too
    reg.reset_scale(1.0)
    assert reg(z, coords, pairs).item() > 0.1


def test_relative_dp_weights_short_pairs_more() -> None:
    """The same absolute error on a short pair costs more with relative weighting."""
    coords = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])
    short = torch.tensor([[0.0], [1.5], [10.0]])  # error 0.5 on the short pair (0, 1)
    long = torch.tensor([[0.0], [1.0], [10.5]])  # error 0.5 on the long pairs (0, 2) and (1, 2)
    pairs = batch_pairs(coords)
    for relative, short_costs_more in ((0.0, False), (1.0, True)):
        reg = DPRegularizer(relative=relative)
        reg.reset_scale(1.0)
        a, b = reg(short, coords, pairs).item(), reg(long, coords, pairs).item()
        assert (a > b) is short_costs_more, (relative, a, b)
    with pytest.raises(ValueError):
        DPRegularizer(relative=2.0)


def test_reset_scale_is_clamped() -> None:
    reg = DPRegularizer(min_scale=1e-2, max_scale=10.0)
    reg.reset_scale(1e6)
    assert float(reg.scale()) == pytest.approx(10.0)
    reg.reset_scale(0.0)
    assert float(reg.scale()) == pytest.approx(1e-2)


def test_dp_is_mean_absolute_gap() -> None:
    coords = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    z = torch.tensor([[0.0], [4.0], [12.0]])
    reg = DPRegularizer()
    reg.reset_scale(1.0)
    pairs = batch_pairs(coords)
    # pairs (0,1): |4-5|=1, (0,2): |12-10|=2, (1,2): |8-5|=3 -> mean 2
    assert reg(z, coords, pairs).item() == pytest.approx(2.0, abs=1e-4)


def test_none_is_zero_with_gradient_graph() -> None:
    z = torch.randn(5, 3, requires_grad=True)
    out = NoRegularizer()(z, torch.randn(5, 2), batch_pairs(torch.randn(5, 2)))
    out.backward()
    assert out.item() == 0.0 and z.grad is not None


def test_batch_pairs_skip_coincident_cells() -> None:
    coords = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    pairs = batch_pairs(coords)
    assert pairs.shape[1] == 2
    assert not np.any((pairs[0] == 0).numpy() & (pairs[1] == 1).numpy())


def test_yaml_options_build() -> None:
    from dpvae.config import load_config

    for option in ("dp", "stress", "none"):
        cfg = load_config([f"model.regularizer={option}"])
        reg = instantiate(cfg.model.regularizer)
        assert reg(torch.randn(6, 4), torch.randn(6, 2), batch_pairs(torch.randn(6, 2))).ndim == 0
