"""Contract tests of every option of the component groups, driven by the option files.

Each YAML file of ``conf/model/{encoder,decoder,likelihood,regularizer}/`` is one row of the table:
it is built the way :class:`dpvae.module.DPVAE` builds it and checked against the contract written
in its base class's docstring. A new option file is tested without editing this file. The last test
checks that each option file and its target's constructor agree on every default ("defaults
defined once": the YAML is the source of truth, the constructor repeats it).
"""

from __future__ import annotations

import copy
import inspect
import math
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from dpvae.config import group_options, instantiate, load_config, locate, to_plain
from dpvae.likelihoods import Likelihood
from dpvae.nn import Decoder, Encoder
from dpvae.regularizers import DistanceRegularizer

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("encoder", "decoder", "likelihood", "regularizer")
OPTIONS = {group: group_options(["model", group], [CONF]) for group in GROUPS}
ALL_OPTIONS = [(group, name) for group in GROUPS for name in OPTIONS[group]]
ZERO_REGULARIZERS = {"none"}  # options documented as "no distance term": exactly 0 everywhere

N_INPUT, N_LATENT, N_GENES, BATCH = 12, 3, 6, 32


@cache
def _spec_cached(group: str, name: str) -> dict[str, Any]:
    cfg = load_config([f"model.{group}={name}"], conf_dir=CONF)
    return to_plain(cfg.model[group])


def spec(group: str, name: str) -> dict[str, Any]:
    """The option file as the composed config hands it to the model (a fresh copy)."""
    return copy.deepcopy(_spec_cached(group, name))


def _trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def _assert_grads_flow(module: nn.Module) -> None:
    """Every trainable parameter got a finite gradient; every weight matrix a non-zero one.

    (1-d parameters may legitimately get zero gradients, e.g. a bias followed by batch norm.)
    """
    params = _trainable(module)
    assert params, f"{type(module).__name__} has no trainable parameters"
    for name, p in params:
        assert p.grad is not None, f"no gradient reached {name}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient in {name}"
        if p.ndim >= 2:
            assert p.grad.abs().sum() > 0, f"zero gradient in weight {name}"


def test_every_group_has_options() -> None:
    for group in GROUPS:
        assert OPTIONS[group], f"no option files found in {CONF / 'model' / group}"
    assert {"gaussian", "nb", "zinb"} <= set(OPTIONS["likelihood"])
    assert {"dp", "stress", "none"} <= set(OPTIONS["regularizer"])


# ------------------------------------------------------------------------------------------ encoders
@pytest.mark.parametrize("name", OPTIONS["encoder"])
def test_encoder_contract(name: str) -> None:
    torch.manual_seed(0)
    enc = instantiate(spec("encoder", name), n_input=N_INPUT, n_latent=N_LATENT)
    assert isinstance(enc, Encoder)
    assert (enc.n_input, enc.n_latent) == (N_INPUT, N_LATENT)
    x = torch.randn(BATCH, N_INPUT)

    enc.train()
    out = enc(x)
    assert isinstance(out, tuple) and len(out) == 2
    mu, logvar = out
    for t in (mu, logvar):
        assert t.shape == (BATCH, N_LATENT) and t.dtype == torch.float32
        assert torch.isfinite(t).all()
    ((mu**2).mean() + (logvar**2).mean()).backward()
    _assert_grads_flow(enc)

    # prediction mode: deterministic, each cell's code independent of the rest of the batch
    enc.eval()
    with torch.no_grad():
        mu_a, logvar_a = enc(x)
        mu_b, _ = enc(x)
        mu_one, logvar_one = enc(x[5:6])
    torch.testing.assert_close(mu_a, mu_b, rtol=0, atol=0)
    torch.testing.assert_close(mu_one, mu_a[5:6], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logvar_one, logvar_a[5:6], rtol=1e-5, atol=1e-6)
    # the embedding depends on the input: different cells get clearly different codes
    assert torch.cdist(mu_a, mu_a).max() > 1e-2
    # extreme input still gives a finite posterior
    with torch.no_grad():
        mu_big, logvar_big = enc(1e4 * x)
    assert torch.isfinite(mu_big).all() and torch.isfinite(logvar_big).all()


# ------------------------------------------------------------------------------------------ decoders
@pytest.mark.parametrize("lik_name", OPTIONS["likelihood"])
@pytest.mark.parametrize("name", OPTIONS["decoder"])
def test_decoder_contract_with_each_likelihood(name: str, lik_name: str) -> None:
    """The decoder's output, sized by the likelihood as the model sizes it, feeds its nll."""
    torch.manual_seed(0)
    lik = instantiate(spec("likelihood", lik_name), n_genes=N_GENES)
    n_output = N_GENES * lik.n_params
    dec = instantiate(spec("decoder", name), n_latent=N_LATENT, n_output=n_output)
    assert isinstance(dec, Decoder)
    assert (dec.n_latent, dec.n_output) == (N_LATENT, n_output)
    z = torch.randn(BATCH, N_LATENT)

    dec.train()
    out = dec(z)
    assert out.shape == (BATCH, n_output) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.min() < 0 < out.max()  # unconstrained values; the likelihood interprets them
    target, library = _valid_target(lik, BATCH)
    nll = lik.nll(out, target, library)
    assert nll.shape == (BATCH,) and torch.isfinite(nll).all()
    nll.mean().backward()
    _assert_grads_flow(dec)

    dec.eval()
    with torch.no_grad():
        full, one = dec(z), dec(z[3:4])
    torch.testing.assert_close(one, full[3:4], rtol=1e-5, atol=1e-6)
    assert torch.cdist(full, full).max() > 1e-2  # the output depends on the code


# --------------------------------------------------------------------------------------- likelihoods
def _valid_target(lik: Likelihood, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A target of the kind the model feeds ``lik`` and the cells' library sizes, (n, G), (n, 1)."""
    g = torch.Generator().manual_seed(seed)
    if lik.requires_counts:
        target = torch.poisson(torch.full((n, lik.n_genes), 4.0), generator=g)
        target[torch.rand(target.shape, generator=g) < 0.3] = 0.0  # many zeros, as in real data
    else:
        target = torch.randn(n, lik.n_genes, generator=g)  # centred, scaled: negative values too
    return target, target.sum(dim=1, keepdim=True).clamp_min(1.0)


def _grid(lik: Likelihood, step: float = 0.01) -> tuple[Tensor, float]:
    """Support points of one gene's value (with their spacing) covering all but negligible mass
    for the parameters these tests use: 0..300 for counts, [-10, 10] in ``step`` for transformed
    values."""
    if lik.requires_counts:
        return torch.arange(0, 301, dtype=torch.float64), 1.0
    return torch.arange(-10.0, 10.0 + step / 2, step, dtype=torch.float64), step


def _conditional_logprob(
    lik: Likelihood, decoded: Tensor, library: Tensor, grid: Tensor, base: Tensor
) -> Tensor:
    """log p(x_g = grid[k]) for every gene g, normalised over the grid, shape (K, G).

    The nll is a sum over genes, so moving one gene's value with the others held at ``base``
    changes only that gene's term; its values over the grid are that gene's log-probabilities up
    to a constant, which the normalisation over the grid removes.
    """
    k, n_genes = grid.shape[0], base.shape[-1]
    rows = base.reshape(1, 1, n_genes).repeat(n_genes, k, 1)
    for gene in range(n_genes):
        rows[gene, :, gene] = grid
    rows = rows.reshape(n_genes * k, n_genes)
    with torch.no_grad():
        nll = lik.nll(decoded.expand(rows.shape[0], -1), rows, library.expand(rows.shape[0], 1))
    logp = -nll.reshape(n_genes, k).T
    return logp - torch.logsumexp(logp, dim=0, keepdim=True)


def _theta(lik: Likelihood, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, lik.n_params * lik.n_genes, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("name", OPTIONS["likelihood"])
def test_likelihood_contract(name: str) -> None:
    torch.manual_seed(0)
    lik = instantiate(spec("likelihood", name), n_genes=N_GENES)
    assert isinstance(lik, Likelihood) and lik.n_genes == N_GENES
    assert isinstance(lik.n_params, int) and lik.n_params >= 1
    assert isinstance(lik.requires_counts, bool)

    g = torch.Generator().manual_seed(5)
    decoded = torch.randn(BATCH, lik.n_params * N_GENES, generator=g).requires_grad_(True)
    blocks = lik.split(decoded)
    assert len(blocks) == lik.n_params
    assert all(b.shape == (BATCH, N_GENES) for b in blocks)

    target, library = _valid_target(lik, BATCH)
    nll = lik.nll(decoded, target, library)
    assert nll.shape == (BATCH,) and nll.dtype == torch.float32
    assert torch.isfinite(nll).all()
    nll.sum().backward()
    assert decoded.grad is not None and torch.isfinite(decoded.grad).all()
    # each of the n_params blocks of the decoder's output is used (a declared but ignored block
    # would leave its gradient at zero)
    for i, block in enumerate(decoded.grad.split(N_GENES, dim=-1)):
        assert block.abs().sum() > 0, f"block {i} of {lik.n_params} does not enter the nll"
    for pname, p in _trainable(lik):
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"gene-wise parameter {pname} gets no gradient"
    # the nll of each cell is its own: one cell alone gives the same value
    one = lik.nll(decoded[7:8], target[7:8], library[7:8])
    torch.testing.assert_close(one, nll[7:8])


@pytest.mark.parametrize("name", OPTIONS["likelihood"])
def test_likelihood_is_normalised_on_its_support(name: str) -> None:
    """exp(-nll) sums to 1 over non-negative integer counts when ``requires_counts`` (a pmf), and
    integrates to 1 over the reals otherwise (a density): the flag says what the nll is a
    likelihood of. Two genes, so the sum over genes is checked too (the 2-D sum is a product)."""
    lik = instantiate(spec("likelihood", name), n_genes=2).double()
    grid, step = _grid(lik, step=0.04)  # a Riemann sum of a smooth density is exact far below
    xs, ys = torch.meshgrid(grid, grid, indexing="ij")
    targets = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)
    library = torch.tensor([[10.0]], dtype=torch.float64)
    for seed in (1, 2):
        decoded = _theta(lik, seed)
        with torch.no_grad():
            nll = lik.nll(
                decoded.expand(len(targets), -1), targets, library.expand(len(targets), 1)
            )
        assert torch.isfinite(nll).all()
        if lik.requires_counts:  # a pmf: every nll >= 0, probabilities sum to 1
            assert nll.min() >= -1e-9
        total = float(torch.exp(-nll).sum() * step * step)
        assert total == pytest.approx(1.0, abs=1e-4), f"exp(-nll) sums to {total}"


@pytest.mark.parametrize("name", OPTIONS["likelihood"])
def test_likelihood_lowest_at_true_parameters(name: str) -> None:
    """Cells drawn from the likelihood at known parameters (decoder output and the module's own
    gene-wise parameters) have a lower mean nll there than at wrong ones (Gibbs' inequality)."""
    lik = instantiate(spec("likelihood", name), n_genes=N_GENES).double()
    grid, step = _grid(lik)
    base = torch.zeros(1, N_GENES, dtype=torch.float64)
    library = torch.tensor([[20.0]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    n_per_type, thetas, cells = 600, [], []
    for seed in (11, 12):  # two cell types
        theta = _theta(lik, seed)
        logp = _conditional_logprob(lik, theta, library, grid, base)
        idx = torch.multinomial(logp.T.exp(), n_per_type, replacement=True, generator=gen).T
        x = grid[idx]
        if not lik.requires_counts:  # spread continuous values uniformly within the grid cell
            x = x + (torch.rand(x.shape, generator=gen, dtype=torch.float64) - 0.5) * step
        thetas.append(theta.expand(n_per_type, -1))
        cells.append(x)
    target = torch.cat(cells)
    true = torch.cat(thetas)
    lib = library.expand(len(target), 1)
    if lik.requires_counts:
        assert torch.equal(target, target.round()) and target.min() >= 0 and target.max() > 0

    def nll(decoded: Tensor) -> Tensor:
        with torch.no_grad():
            return lik.nll(decoded, target, lib)

    def assert_worse(wrong: Tensor, what: str) -> None:
        diff = wrong - at_truth
        t_stat = float(diff.mean() / (diff.std() / math.sqrt(len(diff))))
        assert diff.mean() > 0 and t_stat > 5, f"{what}: mean diff {float(diff.mean())}, t {t_stat}"

    at_truth = nll(true)
    assert torch.isfinite(at_truth).all()
    # the other cell type's parameters
    assert_worse(nll(true.roll(n_per_type, dims=0)), "swapped cell types")
    # each gene given its neighbour's parameters (in every block of the decoder's output)
    rolled = torch.cat([b.roll(1, dims=-1) for b in true.split(N_GENES, dim=-1)], dim=-1)
    assert_worse(nll(rolled), "genes shifted by one")
    # wrong gene-wise parameters of the module itself (a variance, a dispersion)
    params = [p for p in lik.parameters() if p.is_floating_point()]
    if params:
        with torch.no_grad():
            for p in params:
                p.add_(1.0)
        assert_worse(nll(true), "gene-wise parameters + 1")


# ------------------------------------------------------------------------------------- regularizers
def _all_pairs(n: int) -> Tensor:
    """Every index pair i < j of a batch of n cells, (2, P), as the model pairs distinct cells."""
    return torch.triu_indices(n, n, offset=1)


def _isometric(coords: Tensor, lam: float, latent_dim: int, seed: int) -> Tensor:
    """Latent codes whose pairwise distances are exactly ``lam`` times the spatial ones."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(latent_dim, latent_dim, generator=g, dtype=coords.dtype))
    offset = torch.randn(latent_dim, generator=g, dtype=coords.dtype)
    return lam * coords @ q[: coords.shape[1]] + offset


def _regularizer_case(name: str, dim: int, dtype: torch.dtype = torch.float64):
    reg = instantiate(spec("regularizer", name)).to(dtype)
    g = torch.Generator().manual_seed(dim)
    coords = torch.randn(48, dim, generator=g, dtype=dtype)
    pairs = _all_pairs(len(coords))
    lam = 2.5 if reg.scale() is not None else 1.0
    reg.reset_scale(lam)
    z = _isometric(coords, lam, latent_dim=8, seed=dim + 10)
    noise = torch.randn(z.shape, generator=g, dtype=dtype)
    return reg, coords, pairs, lam, z, noise


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("name", OPTIONS["regularizer"])
@torch.no_grad()  # values only; test_regularizer_float32_scalar_and_gradients checks gradients
def test_regularizer_zero_iff_distances_preserved(name: str, dim: int) -> None:
    reg, coords, pairs, lam, z, noise = _regularizer_case(name, dim)
    assert isinstance(reg, DistanceRegularizer)
    scale = reg.scale()
    if scale is not None:  # a learned scale: a positive 0-d tensor that reset_scale sets
        assert scale.ndim == 0 and float(scale.detach()) == pytest.approx(lam, rel=1e-6)
        reg.reset_scale(0.7)
        assert float(reg.scale().detach()) == pytest.approx(0.7, rel=1e-6)
        reg.reset_scale(lam)

    exact = reg(z, coords, pairs)
    assert exact.ndim == 0 and torch.isfinite(exact)
    distorted = [reg(z + s * noise, coords, pairs) for s in (0.05, 0.2, 0.8)]
    single_pair = reg(z + 0.2 * noise, coords, pairs[:, :1])
    assert single_pair.ndim == 0 and torch.isfinite(single_pair) and single_pair >= 0

    if name in ZERO_REGULARIZERS:
        assert float(exact) == 0.0 and all(float(v) == 0.0 for v in distorted)
        assert float(single_pair) == 0.0
        return
    assert float(exact) == pytest.approx(0.0, abs=1e-6)
    values = [float(v) for v in distorted]
    assert values[0] > 1e-5 and values[0] > 1e3 * abs(float(exact)) and values[2] > 1e-2
    assert values[0] < values[1] < values[2], values  # grows with the distortion
    # codes too close together or too far apart (all distances times 0.5 or 2) are penalised
    for factor in (0.5, 2.0):
        assert float(reg(factor * z, coords, pairs)) > 1e-2, factor
    # a rigid motion of the latent codes changes nothing
    shifted = reg(z.flip(-1) + 3.0, coords, pairs)
    assert float(shifted) == pytest.approx(0.0, abs=1e-6)
    if scale is not None:  # proportional, but not at the learned scale: penalised
        for wrong in (lam / 2.0, lam * 2.0):
            reg.reset_scale(wrong)
            assert float(reg(z, coords, pairs)) > 1e-2, wrong
        # and the exact codes at another scale are again ~0 after reset_scale to it
        reg.reset_scale(0.3)
        rescaled = reg(_isometric(coords, 0.3, 8, seed=dim + 10), coords, pairs)
        assert float(rescaled) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", OPTIONS["regularizer"])
def test_regularizer_float32_scalar_and_gradients(name: str) -> None:
    reg, coords, pairs, _, z, noise = _regularizer_case(name, 2, dtype=torch.float32)
    codes = (z + 0.3 * noise).requires_grad_(True)
    loss = reg(codes, coords, pairs)
    assert loss.shape == () and loss.dtype == torch.float32
    value = float(loss.detach())
    assert math.isfinite(value) and value >= 0
    loss.backward()  # the graph is intact, also for a term that is always zero
    assert codes.grad is not None and torch.isfinite(codes.grad).all()
    if name in ZERO_REGULARIZERS:
        assert value == 0.0 and float(codes.grad.abs().sum()) == 0.0
        return
    assert codes.grad.abs().sum() > 0, "no gradient reaches the latent codes"
    for pname, p in _trainable(reg):  # the learned scale, when learned
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"no gradient reaches {pname}"


# ------------------------------------------------------------------------------ defaults defined once
def constructor_defaults(cls: type) -> dict[str, Any]:
    """Keyword defaults of ``cls.__init__``, following ``**kwargs`` up to the base classes that
    receive them (e.g. DPRegularizer's ``**kwargs`` are ScaledDistanceRegularizer's options)."""
    defaults: dict[str, Any] = {}
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            break
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        for p in params:
            if p.default is not inspect.Parameter.empty:
                defaults.setdefault(p.name, p.default)
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            break
    return defaults


def _same(a: Any, b: Any) -> bool:
    """YAML value ``a`` equals default ``b`` (a list equals a tuple; ``true`` does not equal 1)."""
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return type(a) is type(b) and a == b or isinstance(a, float) and isinstance(b, int) and a == b


@pytest.mark.parametrize(("group", "name"), ALL_OPTIONS)
def test_option_file_values_are_the_constructor_defaults(group: str, name: str) -> None:
    """Each option a YAML file sets has a constructor default (the contract: every option has
    one), and it is the same value, so the two cannot drift apart."""
    options = spec(group, name)
    cls = locate(options.pop("_target_"))
    defaults = constructor_defaults(cls)
    mismatched = {}
    for key, value in options.items():
        assert key in defaults, f"{name}.yaml sets {key}, which {cls.__name__} has no default for"
        if not _same(value, defaults[key]):
            mismatched[key] = {"yaml": value, "constructor": defaults[key]}
    assert not mismatched, f"conf/model/{group}/{name}.yaml vs {cls.__name__}: {mismatched}"
