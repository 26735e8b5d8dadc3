"""Likelihood log-probabilities against independent computations (scipy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from dpvae.likelihoods import (
    GaussianLikelihood,
    NBLikelihood,
    NegativeBinomial,
    ZeroInflatedNegativeBinomial,
    ZINBLikelihood,
)

rng = np.random.default_rng(0)


def _random_counts(shape: tuple[int, int]) -> np.ndarray:
    counts = rng.poisson(rng.gamma(0.5, 4.0, size=shape)).astype(np.float64)
    counts[rng.random(shape) < 0.3] = 0.0
    return counts


def test_negative_binomial_matches_scipy() -> None:
    x = _random_counts((50, 20))
    mu = rng.gamma(1.0, 3.0, size=x.shape) + 1e-3
    theta = rng.gamma(2.0, 1.0, size=x.shape) + 1e-2
    ours = NegativeBinomial(torch.tensor(mu), torch.tensor(theta)).log_prob(torch.tensor(x))
    ref = stats.nbinom.logpmf(x, theta, theta / (theta + mu))
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-6, atol=1e-6)


def test_zinb_matches_mixture() -> None:
    x = _random_counts((40, 15))
    mu = rng.gamma(1.0, 3.0, size=x.shape) + 1e-3
    theta = rng.gamma(2.0, 1.0, size=x.shape) + 1e-2
    logits = rng.normal(size=x.shape)
    pi = 1 / (1 + np.exp(-logits))
    nb = stats.nbinom.pmf(x, theta, theta / (theta + mu))
    ref = np.log(np.where(x == 0, pi + (1 - pi) * nb, (1 - pi) * nb))
    dist = ZeroInflatedNegativeBinomial(torch.tensor(mu), torch.tensor(theta), torch.tensor(logits))
    np.testing.assert_allclose(dist.log_prob(torch.tensor(x)).numpy(), ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dist.mean.numpy(), (1 - pi) * mu, rtol=1e-6)


def test_gaussian_likelihood_matches_scipy() -> None:
    lik = GaussianLikelihood(n_genes=7)
    with torch.no_grad():
        lik.log_std.copy_(torch.tensor(rng.normal(scale=0.5, size=7)))
    x = rng.normal(size=(9, 7))
    mean = rng.normal(size=(9, 7))
    ours = lik.nll(torch.tensor(mean), torch.tensor(x), torch.ones(9, 1)).detach().numpy()
    sd = np.exp(lik.log_std.detach().numpy())
    ref = -stats.norm.logpdf(x, mean, sd).sum(axis=1)
    np.testing.assert_allclose(ours, ref, rtol=1e-5)


@pytest.mark.parametrize("cls", [NBLikelihood, ZINBLikelihood])
def test_count_likelihoods_use_library_size(cls: type) -> None:
    """The NB mean is softmax(logits) * library, so doubling depth doubles the mean."""
    g = 6
    lik = cls(n_genes=g)
    decoded = torch.tensor(rng.normal(size=(4, g * cls.n_params)), dtype=torch.float32)
    library = torch.tensor([[10.0], [20.0], [40.0], [80.0]])
    mean = lik.distribution(decoded, library).mu
    np.testing.assert_allclose(mean.sum(dim=1).numpy(), library.squeeze(1).numpy(), rtol=1e-5)
    x = torch.tensor(_random_counts((4, g)), dtype=torch.float32)
    nll = lik.nll(decoded, x, library)
    assert nll.shape == (4,)
    expected = -lik.distribution(decoded, library).log_prob(x).sum(dim=1)
    torch.testing.assert_close(nll, expected)


def test_gaussian_nll_and_its_gradients_are_the_textbook_expression() -> None:
    """The hand-written backward gives the written-out expression's loss and gradients (to float
    rounding), and passes torch's numerical gradient check in double precision."""
    import math

    from dpvae.likelihoods.gaussian import _GaussianNLL

    torch.manual_seed(0)
    lik = GaussianLikelihood(3000)
    with torch.no_grad():
        lik.log_std.normal_()
    decoded = torch.randn(64, 3000, requires_grad=True)
    target = torch.randn(64, 3000)
    weights = torch.rand(64)  # a loss that weighs the cells unequally
    ours = lik.nll(decoded, target, torch.ones(64, 1))
    (ours * weights).sum().backward()
    grads = decoded.grad.clone(), lik.log_std.grad.clone()
    decoded.grad = lik.log_std.grad = None
    log_std = lik.log_std.clamp_min(lik.min_log_std)
    z = (target - decoded) * torch.exp(-log_std)
    textbook = (0.5 * z * z + log_std + 0.5 * math.log(2 * math.pi)).sum(dim=-1)
    (textbook * weights).sum().backward()
    torch.testing.assert_close(ours, textbook, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(grads[0], decoded.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], lik.log_std.grad, rtol=1e-4, atol=1e-3)
    # batches of more dimensions keep their shape
    three = lik.nll(decoded.detach().reshape(8, 8, 3000), target.reshape(8, 8, 3000), None)
    torch.testing.assert_close(three.reshape(64), ours.detach())
    # a clamped log standard deviation gets no gradient, as through clamp_min
    lik.log_std.data[:5] = -9.0
    lik.log_std.grad = None
    lik.nll(decoded, target, torch.ones(64, 1)).sum().backward()
    assert torch.all(lik.log_std.grad[:5] == 0)
    args = (
        torch.randn(5, 7, dtype=torch.float64, requires_grad=True),
        torch.randn(5, 7, dtype=torch.float64),
        torch.randn(7, dtype=torch.float64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(_GaussianNLL.apply, args)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("log1p", [True, False])
@pytest.mark.parametrize("scale", [True, False])
def test_the_transform_of_data_writes_in_place_to_the_same_bits(
    normalize: bool, log1p: bool, scale: bool
) -> None:
    """Expression without a graph goes through the in-place path: the same values, bit for bit,
    as the path an input requiring gradients takes, and the raw batch is left as it was."""
    from dpvae.preprocess import ExpressionTransform

    g = 500
    rng = np.random.default_rng(0)
    moments = {}
    if scale:
        moments = {"gene_mean": rng.random(g).tolist(), "gene_std": (rng.random(g) + 0.5).tolist()}
    transform = ExpressionTransform(normalize, log1p, n_genes=g, clip=3.0, **moments)
    raw = torch.as_tensor(rng.poisson(2.0, (40, g)), dtype=torch.float32)
    raw[3] = 0.0  # an empty cell
    kept = raw.clone()
    x, library = transform(raw)
    assert torch.equal(raw, kept)
    graph_x, graph_library = transform(raw.clone().requires_grad_(True))
    assert torch.equal(x, graph_x.detach()) and torch.equal(library, graph_library.detach())
    if not (normalize or log1p or scale):
        assert torch.equal(x, raw)


def test_gaussian_nll_passes_gradients_to_its_target_and_broadcasts() -> None:
    """A target with a graph (a transformed input requiring gradients) gets the expression's
    gradient; decoded values of several samples broadcast against one target."""
    import math

    torch.manual_seed(1)
    lik = GaussianLikelihood(40)
    target = torch.randn(6, 40, requires_grad=True)
    decoded = torch.randn(6, 40, requires_grad=True)
    lik.nll(decoded, target, None).sum().backward()
    ours = target.grad.clone(), decoded.grad.clone()
    target.grad = decoded.grad = None
    log_std = lik.log_std.clamp_min(lik.min_log_std)
    z = (target - decoded) * torch.exp(-log_std)
    (0.5 * z * z + log_std + 0.5 * math.log(2 * math.pi)).sum().backward()
    torch.testing.assert_close(ours[0], target.grad)
    torch.testing.assert_close(ours[1], decoded.grad)
    samples = torch.randn(3, 6, 40)
    many = lik.nll(samples, target.detach(), None)
    assert many.shape == (3, 6)
    torch.testing.assert_close(many[1], lik.nll(samples[1], target.detach(), None))
