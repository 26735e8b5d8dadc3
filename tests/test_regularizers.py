"""Regularizers: zero on an exactly scaled copy, growing with distortion; the scale reset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor

from dpvae.config import instantiate
from dpvae.errors import ConfigError
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
    with pytest.raises(ConfigError, match="relative must be in"):
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


def _assert_read_as_a_clone_is(regularizer: type, coords: Tensor, pairs: Tensor) -> None:
    """The regularizer's loss and every gradient on ``pairs`` equal, bit for bit, those on a
    clone of them (a tensor of no remembered kind, read through condensed_index by position)."""
    results = []
    for p in (pairs, pairs.clone()):
        z = torch.randn(64, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        reg = regularizer()
        reg.reset_scale(0.7)
        loss = reg(z, coords, p)
        loss.backward()
        results.append((loss.detach(), z.grad, reg.log_scale.grad))
    (l0, g0, s0), (l1, g1, s1) = results
    assert torch.equal(l0, l1) and torch.equal(g0, g1) and torch.equal(s0, s1)


@pytest.mark.parametrize("regularizer", [DPRegularizer, StressRegularizer])
def test_all_pairs_read_without_a_gather_give_the_same_loss_and_gradients(
    regularizer: type,
) -> None:
    """A batch without coincident cells gets the one shared all-pairs tensor, which the pair
    distances read as the whole pdist output: the loss and every gradient are those of the
    same pairs gathered by position, bit for bit."""
    from dpvae.regularizers.base import all_pairs

    torch.manual_seed(0)
    coords = torch.rand(64, 2)
    pairs = batch_pairs(coords)
    assert pairs is all_pairs(64, coords.device)  # shared: no copy, no gather
    _assert_read_as_a_clone_is(regularizer, coords, pairs)


def test_yaml_options_build() -> None:
    from dpvae.config import load_config

    for option in ("dp", "stress", "none"):
        cfg = load_config([f"model.regularizer={option}"])
        reg = instantiate(cfg.model.regularizer)
        assert reg(torch.randn(6, 4), torch.randn(6, 2), batch_pairs(torch.randn(6, 2))).ndim == 0


# ------------------------------------------------------------------ weighted pair sets
@pytest.mark.parametrize("cls", [DPRegularizer, StressRegularizer])
def test_unit_weights_change_nothing_and_weights_select_pairs(cls: type) -> None:
    coords = torch.randn(20, 2, dtype=torch.float64)
    z = torch.randn(20, 4, dtype=torch.float64)
    pairs = batch_pairs(coords)
    reg = cls().double()
    reg.reset_scale(0.7)
    plain = reg(z, coords, pairs)
    assert reg(z, coords, pairs, weight=torch.ones(pairs.shape[1], dtype=torch.float64)).item() == (
        pytest.approx(plain.item(), rel=1e-12)
    )
    # weight only on the first 10 pairs: the term of those 10 pairs alone
    w = torch.zeros(pairs.shape[1], dtype=torch.float64)
    w[:10] = 3.0
    assert reg(z, coords, pairs, weight=w).item() == pytest.approx(
        reg(z, coords, pairs[:, :10]).item(), rel=1e-10
    )
    # an exactly scaled copy is still 0 whatever the weights
    exact = _scaled_copy(coords, 0.7, latent_dim=4)
    assert reg(exact, coords, pairs, weight=torch.rand(pairs.shape[1])).item() == pytest.approx(
        0.0, abs=1e-4
    )


def test_dp_weighted_mean_gap_by_hand() -> None:
    coords = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    z = torch.tensor([[0.0], [4.0], [12.0]])
    reg = DPRegularizer()
    reg.reset_scale(1.0)
    pairs = batch_pairs(coords)  # gaps 1, 2, 3
    w = torch.tensor([0.5, 0.25, 0.25])
    assert reg(z, coords, pairs, weight=w).item() == pytest.approx(0.5 + 0.5 + 0.75, abs=1e-4)
    rel = DPRegularizer(relative=1.0)  # relative weights (mean d / d) times the pair weights
    rel.reset_scale(1.0)
    d = torch.tensor([5.0, 10.0, 5.0])
    expected = (torch.tensor([1.0, 2.0, 3.0]) * w / d).sum() / (w / d).sum()
    assert rel(z, coords, pairs, weight=w).item() == pytest.approx(expected.item(), rel=1e-4)


class _Legacy(torch.nn.Module):
    """A user-written forward(z, coords, pairs) from before pair weights: mean latent distance."""

    def forward(self, z: torch.Tensor, coords: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        return (z[pairs[0]] - z[pairs[1]]).norm(dim=-1).mean()


def test_regularizers_without_weight_get_weight_resampled_pairs() -> None:
    from types import SimpleNamespace

    from dpvae.module import DPVAE
    from dpvae.regularizers import accepts_weight

    assert accepts_weight(DPRegularizer()) and accepts_weight(StressRegularizer())
    assert accepts_weight(NoRegularizer()) and not accepts_weight(_Legacy())
    z = torch.tensor([[0.0], [1.0], [5.0], [9.0]])
    coords = torch.randn(4, 2)
    pairs = torch.tensor([[0, 0, 2], [1, 2, 3]])
    host = SimpleNamespace(regularizer=_Legacy(), _weighted_regularizer=False)
    # all the weight on pair (0, 2): every drawn pair is that one
    out = DPVAE._regularize(host, z, coords, pairs, torch.tensor([0.0, 1.0, 0.0]))  # type: ignore[arg-type]
    assert out.item() == pytest.approx(5.0)
    # in expectation the weighted mean: 0.5 * 1 + 0.5 * 4 = 2.5
    torch.manual_seed(0)
    draws = [
        DPVAE._regularize(host, z, coords, pairs, torch.tensor([0.5, 0.0, 0.5])).item()  # type: ignore[arg-type]
        for _ in range(400)
    ]
    assert np.mean(draws) == pytest.approx(2.5, abs=0.1)
    # no weights: the user's form sees exactly the pairs
    assert DPVAE._regularize(host, z, coords, pairs, None).item() == pytest.approx(10 / 3)  # type: ignore[arg-type]


def test_batch_pair_set_and_the_scale_that_minimises_the_weighted_gap() -> None:
    from dpvae.module import batch_pair_set, weighted_median

    coords = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    batch = {
        "coords": coords,
        "pairs": torch.tensor([[0, 0, 1, 2], [1, 2, 3, 3]]),
        "pair_weight": torch.tensor([0.4, 0.2, 0.2, 0.2]),
    }
    pairs, weight = batch_pair_set(batch, coords)
    assert pairs.tolist() == [[0, 1, 2], [2, 3, 3]]  # (0, 1) share a position: dropped
    assert weight is not None and weight.tolist() == pytest.approx([0.2, 0.2, 0.2])
    all_pairs, none = batch_pair_set({"coords": coords}, coords)
    assert none is None and all_pairs.tolist() == batch_pairs(coords).tolist()
    # lambda at switch-on: the weighted median of dz / d with weights w * d minimises
    # sum w |dz - lambda d|
    gen = torch.Generator().manual_seed(1)
    dz, d, w = (torch.rand(50, generator=gen) + 0.01 for _ in range(3))
    lam = weighted_median(dz / d, w * d)

    def cost(x: float) -> float:
        return float((w * (dz - x * d).abs()).sum())

    grid = torch.linspace(0.01, 10.0, 2000).tolist()
    assert cost(float(lam)) <= min(cost(x) for x in grid) + 1e-6
    v = torch.tensor([4.0, 1.0, 3.0, 2.0])
    assert weighted_median(v, torch.ones(4)) == torch.median(v)


def test_pair_distances_are_the_explicit_formula_in_value_and_gradient() -> None:
    """pdist read at the pairs' condensed positions: the same distances and gradients as
    gathering the pairs' rows, for pairs in either order and with repeated pairs."""
    from dpvae.regularizers.base import pair_distances

    gen = torch.Generator().manual_seed(3)
    z = torch.randn(40, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    coords = torch.rand(40, 2, generator=gen, dtype=torch.float64)
    i = torch.randint(0, 40, (300,), generator=gen)
    j = (i + torch.randint(1, 40, (300,), generator=gen)) % 40  # distinct from i, any order
    pairs = torch.stack([i, j])
    dz, d = pair_distances(z, coords, pairs)
    w = torch.rand(300, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad((w * dz).sum(), z)
    z2 = z.detach().clone().requires_grad_()
    dz2 = torch.sqrt(((z2[i] - z2[j]) ** 2).sum(-1) + 1e-10)
    d2 = torch.linalg.vector_norm(coords[i] - coords[j], dim=-1)
    (grad2,) = torch.autograd.grad((w * dz2).sum(), z2)
    torch.testing.assert_close(dz, dz2)
    torch.testing.assert_close(d, d2)
    torch.testing.assert_close(grad, grad2)
    # all in-batch pairs of batch_pairs are pdist's own order: read without a gather, they are
    # the pairs' own distances; the same pairs in another order are read by position
    everything = batch_pairs(coords)
    assert everything.shape[1] == 40 * 39 // 2
    for p in (everything, everything.flip(1), everything.clone()):
        explicit = torch.linalg.vector_norm(coords[p[0]] - coords[p[1]], dim=-1)
        torch.testing.assert_close(pair_distances(z, coords, p)[1], explicit)
        explicit_z = torch.sqrt(((z[p[0]] - z[p[1]]) ** 2).sum(-1) + 1e-10)
        torch.testing.assert_close(pair_distances(z, coords, p)[0], explicit_z)


def test_the_shared_pairs_serve_training_after_an_inference_mode_pass() -> None:
    """Lightning's sanity check runs validation under inference mode first: the shared
    all-pairs tensor it creates must still be gathered and saved for a backward pass later."""
    from dpvae.regularizers.base import _ALL_PAIRS

    _ALL_PAIRS.clear()
    coords = torch.rand(37, 2)
    with torch.inference_mode():
        first = batch_pairs(coords)
    pairs = batch_pairs(coords)
    assert pairs is first and not pairs.is_inference()
    z = torch.randn(37, 4, requires_grad=True)
    (z[pairs[0]] - z[pairs[1]]).pow(2).sum().backward()  # a custom regularizer's gather
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_coordinate_pdist_is_torch_s_bit_for_bit(osmfish) -> None:  # type: ignore[no-untyped-def]
    """The padded rows give torch.pdist's own distances (its partial-register path adds the
    columns in order; a full register of columns at lanes 0, 4, 2, 1 sums them in that order):
    on osmFISH's real 2-D positions, in 3-D and 4-D with magnitudes apart, and in a batch of
    near-coincident cells. Elsewhere (1-D, 5-D, float64, a coordinate that needs a gradient)
    pdist is called as it is."""
    from dpvae.regularizers.base import coordinate_pdist, narrow_pdist_width

    if torch.backends.cpu.get_cpu_capability() == "AVX2":  # this project's machines: in use
        assert narrow_pdist_width(2) == narrow_pdist_width(3) == 8
    gen = torch.Generator().manual_seed(3)
    real = torch.as_tensor(np.asarray(osmfish.obsm["spatial"], dtype=np.float32))
    cases = [real[:900], (real[:900] - real.mean(0)) / real.std()]
    for dim in (1, 2, 3, 4, 5):
        scales = torch.logspace(-4, 4, dim)
        cases.append(torch.randn(500, dim, generator=gen) * scales)
    close = torch.randn(1, 3, generator=gen).repeat(300, 1)
    cases.append(close + 1e-6 * torch.randn(300, 3, generator=gen))
    for coords in cases:
        assert torch.equal(coordinate_pdist(coords), torch.pdist(coords)), coords.shape
    double = cases[3].double()
    assert torch.equal(coordinate_pdist(double), torch.pdist(double))
    grad = cases[3].clone().requires_grad_(True)
    assert coordinate_pdist(grad).requires_grad


@pytest.mark.parametrize("regularizer", [DPRegularizer, StressRegularizer])
def test_a_batch_with_a_cell_twice_reads_its_pairs_at_their_remembered_positions(
    regularizer: type,
) -> None:
    """A neighbour partner drawn among the sampled cells puts a cell twice in a batch: its pairs
    with itself are left out, and the pair distances read the rest at the positions batch_pairs
    remembered. The loss and every gradient are those of the same pairs located anew (a clone is
    read through condensed_index), bit for bit; the positions are the pairs' own."""
    from dpvae.regularizers import base
    from dpvae.regularizers.base import all_pairs, condensed_index

    torch.manual_seed(0)
    coords = torch.rand(64, 2)
    coords[[5, 40, 41]] = coords[[17, 3, 3]]  # three cells twice (one of them three times)
    pairs = batch_pairs(coords)
    assert pairs.shape[1] == 64 * 63 // 2 - 4
    assert pairs is not all_pairs(64, coords.device)
    kept = torch.pdist(coords)[condensed_index(pairs, 64)]
    assert bool((kept > 0).all())
    remembered, positions, n = base._SOME_PAIRS  # what read_pairs reads at
    assert remembered is pairs and n == 64
    assert torch.equal(positions, condensed_index(pairs, 64))
    _assert_read_as_a_clone_is(regularizer, coords, pairs)
    # the same pairs read over rows of another number are located anew, never at positions
    # remembered for 64 rows
    wider = torch.rand(70, 2)
    np_pairs = pairs.clone()
    assert torch.equal(
        base.read_pairs(torch.pdist(wider), pairs, 70),
        torch.pdist(wider)[condensed_index(np_pairs, 70)],
    )
