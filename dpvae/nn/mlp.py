"""A configurable multilayer perceptron shared by the MLP encoder and decoder."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from dpvae.errors import ACTIVATIONS, check_mlp_options
from dpvae.nn.dropout import ByteDropout, Dropout

_ACTIVATIONS = {name: getattr(nn, cls) for name, cls in ACTIVATIONS.items()}


def mlp(
    n_in: int,
    hidden: Sequence[int],
    dropout: float = 0.0,
    norm: str = "batch",
    activation: str = "relu",
    byte_dropout: bool = False,
) -> nn.Sequential:
    """Hidden layers ``Linear -> norm -> activation -> dropout`` for each width in ``hidden``
    (dropout: :class:`dpvae.nn.dropout.ByteDropout` with ``byte_dropout``).

    The output width is ``hidden[-1]`` (or ``n_in`` when ``hidden`` is empty).
    """
    check_mlp_options(hidden=hidden, dropout=dropout, norm=norm, activation=activation)
    layers: list[nn.Module] = []
    width = n_in
    for h in hidden:
        layers.append(nn.Linear(width, int(h)))
        if norm == "batch":
            layers.append(nn.BatchNorm1d(int(h)))
        elif norm == "layer":
            layers.append(nn.LayerNorm(int(h)))
        layers.append(_ACTIVATIONS[activation]())
        if dropout > 0:
            layers.append(ByteDropout(dropout) if byte_dropout else Dropout(dropout))
        width = int(h)
    return nn.Sequential(*layers)


def out_width(n_in: int, hidden: Sequence[int]) -> int:
    """Width of the output of :func:`mlp`."""
    return int(hidden[-1]) if len(hidden) else n_in
