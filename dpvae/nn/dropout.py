"""Dropout whose mask costs one random byte an element (``torch.nn.Dropout`` draws a Bernoulli
float per element: on CPU that was 18% of a 2000-gene training step)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

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
