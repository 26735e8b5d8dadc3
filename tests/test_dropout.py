"""The encoder's and hidden layers' dropout: Dropout (torch's, bit for bit, a cheaper mask on
CPU) and ByteDropout (an option: a one-byte-per-element mask, another random stream)."""

from __future__ import annotations

import pytest
import torch

from dpvae.errors import ConfigError
from dpvae.nn.dropout import ByteDropout, Dropout, uniform_draws_bernoulli


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_keeps_each_element_with_its_probability_and_the_expectation(p: float) -> None:
    layer = ByteDropout(p).train()
    torch.manual_seed(0)
    x = torch.full((400, 2500), 2.0)  # a million elements
    y = layer(x)
    kept = y != 0
    q = round((1 - p) * 256) / 256
    assert abs(q - (1 - p)) <= 1 / 512
    # a binomial proportion over 1e6 elements: sd 5e-4
    assert kept.float().mean().item() == pytest.approx(q, abs=3e-3)
    assert torch.allclose(y[kept], torch.tensor(2.0 / q))  # kept elements scaled by 1/q
    assert y.mean().item() == pytest.approx(2.0, rel=5e-3)  # the expectation is the input
    # every byte of the random words is used: the mask has no stripes (each column position of
    # 8 consecutive elements keeps at rate q)
    rates = kept.reshape(-1, 8).float().mean(0)
    assert torch.allclose(rates, torch.full((8,), q), atol=6e-3), rates


def test_seeded_identity_in_eval_and_gradients() -> None:
    layer = ByteDropout(0.3)
    x = torch.randn(64, 100)
    torch.manual_seed(5)
    a = layer(x)
    torch.manual_seed(5)
    b = layer(x)
    assert torch.equal(a, b)  # torch's generator, seeded as any other draw
    assert torch.equal(layer.eval()(x), x)
    layer.train()
    h = torch.randn(64, 100, requires_grad=True)
    out = layer(h)
    (grad,) = torch.autograd.grad(out.sum(), h)
    assert torch.equal(grad, (out != 0).float() * layer.scale)  # d(out)/dh: the scaled mask
    assert x.data_ptr() != layer(x).data_ptr()  # the input is never overwritten


def test_bad_probability_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"dropout must be in \[0, 1\)"):
        ByteDropout(1.0)


def test_the_encoder_option_chooses_the_mask() -> None:
    """model.encoder.byte_dropout=true puts ByteDropout on the input and hidden layers; the
    default keeps torch's Bernoulli dropout (the benchmarked random stream)."""
    from torch import nn

    from dpvae.nn import MLPEncoder

    default = MLPEncoder(50, 4)
    fast = MLPEncoder(50, 4, byte_dropout=True)
    assert isinstance(default.input_dropout, nn.Dropout)
    assert not any(isinstance(m, ByteDropout) for m in default.modules())
    assert isinstance(fast.input_dropout, ByteDropout) and fast.input_dropout.p == 0.3
    assert [m.p for m in fast.body if isinstance(m, ByteDropout)] == [0.1]


@pytest.mark.parametrize(
    ("shape", "p", "grad", "dtype"),
    [
        ((256, 2000), 0.3, False, torch.float32),  # the encoder's input: data, no graph
        ((300, 128), 0.1, True, torch.float32),  # a hidden layer
        ((50, 33), 0.5, True, torch.float64),
    ],
)
def test_dropout_is_torch_s_bit_for_bit(
    shape: tuple[int, int], p: float, grad: bool, dtype: torch.dtype
) -> None:
    """The same outputs, gradients and random stream after it as torch.nn.Dropout, whichever
    way this machine draws the mask (the default models' placements depend on it)."""
    x = torch.randn(shape, dtype=dtype, requires_grad=grad)
    out = []
    for layer in (torch.nn.Dropout(p), Dropout(p)):
        torch.manual_seed(7)
        y = layer.train()(x)
        after = torch.rand(3)
        g = torch.autograd.grad(y, x, torch.ones_like(y))[0] if grad else None
        out.append((y.detach(), after, g))
    (y0, a0, g0), (y1, a1, g1) = out
    assert y0.dtype == y1.dtype and torch.equal(y0, y1)
    assert torch.equal(a0, a1)  # the generator moved exactly as far
    assert g0 is None or (g1 is not None and torch.equal(g0, g1))
    assert torch.equal(Dropout(p).eval()(x), x)


@pytest.mark.parametrize("layout", ["transposed", "channels_last", "sliced"])
def test_dropout_follows_the_input_s_memory_layout(layout: str) -> None:
    """torch fills the mask in the input's memory order: so does Dropout (same values, strides
    and generator state for inputs that are not row-major)."""
    base = torch.randn(2, 3, 40, 50)
    x = {
        "transposed": torch.randn(300, 200).t(),
        "channels_last": base.to(memory_format=torch.channels_last),
        "sliced": base[:, 1:, ::2],
    }[layout]
    torch.manual_seed(3)
    a, after_a = torch.nn.functional.dropout(x, 0.3, True), torch.rand(2)
    torch.manual_seed(3)
    b, after_b = Dropout(0.3).train()(x), torch.rand(2)
    assert torch.equal(a, b) and a.stride() == b.stride() and torch.equal(after_a, after_b)


def test_dropout_draws_its_own_mask_where_that_is_torch_s(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where a float64 uniform below 1 - p is torch's Bernoulli draw (torch's generic CPU kernel:
    AMD, or no MKL), the layer draws the mask itself (4.7 -> 2.1 ms for a 256 x 2000 mask);
    elsewhere it is torch's dropout."""
    import torch.nn.functional as F

    calls = []
    real = F.dropout
    monkeypatch.setattr(F, "dropout", lambda *a, **k: calls.append(1) or real(*a, **k))
    Dropout(0.3).train()(torch.randn(20, 10))
    assert calls == ([] if uniform_draws_bernoulli() else [1])
