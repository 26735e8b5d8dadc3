"""Cheaper dropout masks.

:class:`Dropout` is ``torch.nn.Dropout`` with the same masks, outputs, gradients and random
stream, bit for bit, drawn faster on CPUs where that can be done; :class:`ByteDropout` (an option)
costs one random byte an element but is another random stream.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: dtypes whose masks :func:`dropout` draws itself (others go to ``torch.nn.functional.dropout``)
_OWN_DTYPES = (torch.float32, torch.float64)


@functools.cache
def uniform_draws_bernoulli() -> bool:
    """Whether a float64 uniform draw compared with ``q`` (``empty(...).uniform_() < q``) is
    torch's CPU ``bernoulli_(q)``: the same mask and the same generator state after it.

    On CPUs where torch draws a Bernoulli mask with its generic kernel (AMD's, and any build
    without MKL) each element is one float64 uniform compared with ``q``, drawn one at a time
    through a per-element call: 9 ns an element, against 4 for the vectorised uniform draw (a
    256 x 2000 mask: 4.7 ms against 2.1). On Intel CPUs with MKL torch takes MKL's own Bernoulli
    generator, which is fast and another stream: there this returns False and nothing changes.
    Told by drawing both from private generators once per process (the global one is untouched),
    in one and in two dimensions, across torch's parallel grain (32,768 elements).
    """
    for shape in ((4099,), (300, 200)):
        first = torch.Generator().manual_seed(20261206)
        mask = torch.empty(shape, device="cpu").bernoulli_(0.7, generator=first)
        second = torch.Generator().manual_seed(20261206)
        drawn = (
            torch.empty(shape, dtype=torch.float64, device="cpu").uniform_(generator=second) < 0.7
        )
        same = torch.equal(mask, drawn.to(mask.dtype))
        if not same or not torch.equal(first.get_state(), second.get_state()):
            return False
    return True


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """``torch.nn.functional.dropout(x, p, training)``, bit for bit (outputs, gradients and the
    random stream), with the mask drawn by :func:`uniform_draws_bernoulli`'s faster equivalent
    where it holds (a CPU float tensor). The arithmetic is torch's own CPU dropout: the mask, as
    floats, divided by ``1 - p`` in place, times the input."""
    own = x.device.type == "cpu" and x.dtype in _OWN_DTYPES and 0.0 < p < 1.0
    if not (training and own and uniform_draws_bernoulli()):
        return F.dropout(x, p, training)
    keep = 1.0 - p
    # drawn into a tensor of the input's layout, in memory order, as torch's empty_like noise is
    noise = (torch.empty_like(x, dtype=torch.float64).uniform_() < keep).to(x.dtype)
    noise.div_(keep)
    if x.requires_grad:
        return x * noise
    return noise.mul_(x)  # data (the encoder's input): no graph, the product in place


class Dropout(nn.Dropout):
    """``torch.nn.Dropout`` through :func:`dropout` (the same results, a cheaper mask on CPU)."""

    def forward(self, input: Tensor) -> Tensor:
        if self.inplace:
            return super().forward(input)
        return dropout(input, self.p, self.training)


#: mask resolution: an element is kept when its random byte is below ``round(keep * 256)``
LEVELS = 256


class ByteDropout(nn.Module):
    """Inverted dropout with its keep probability rounded to a multiple of 1/256.

    In training, every element is kept with probability ``q = round((1 - p) * 256) / 256`` (within
    1/512 of ``1 - p``) and scaled by ``1 / q``, so the expectation is the input, as with
    :class:`torch.nn.Dropout`; in evaluation it is the identity. The mask is 8 random bytes per
    int64 draw of torch's generator (seeded by ``torch.manual_seed`` like any other draw).

    Args:
        p: drop probability, in [0, 1).
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            from dpvae.errors import ConfigError

            raise ConfigError(f"dropout must be in [0, 1), got {p}")
        self.p = float(p)
        self.threshold = max(1, min(LEVELS, round((1.0 - self.p) * LEVELS)))
        self.scale = LEVELS / self.threshold

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.threshold >= LEVELS:
            return x
        n = x.numel()
        words = torch.empty((n + 7) // 8, dtype=torch.int64, device=x.device)
        words.random_(-(2**63), None)  # every bit uniform (random_() alone leaves the sign 0)
        keep = words.view(torch.uint8)[:n].view(x.shape) < self.threshold
        mask = keep.to(x.dtype)
        if x.requires_grad:
            return x * mask.mul_(self.scale)
        return mask.mul_(x).mul_(self.scale)  # data (the encoder's input): no graph, in place
