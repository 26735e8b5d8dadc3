"""Decoders: latent code -> the parameters a likelihood needs for every gene."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from dpvae.nn.mlp import mlp, out_width


class Decoder(nn.Module):
    """Base class of decoders.

    Contract:
        * ``__init__(n_latent, n_output, **options)``; every option has a default.
        * ``forward(z)`` maps (B, n_latent) to (B, n_output) unconstrained values. The model sets
          ``n_output = likelihood.n_params * n_genes``; the likelihood interprets them.
    """

    def __init__(self, n_latent: int, n_output: int) -> None:
        super().__init__()
        self.n_latent = n_latent
        self.n_output = n_output

    def forward(self, z: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class MLPDecoder(Decoder):
    """Multilayer perceptron decoder (same options as :class:`~dpvae.nn.MLPEncoder`)."""

    def __init__(
        self,
        n_latent: int,
        n_output: int,
        hidden: Sequence[int] = (128,),
        dropout: float = 0.0,
        norm: str = "batch",
        activation: str = "relu",
    ) -> None:
        super().__init__(n_latent, n_output)
        self.body = mlp(n_latent, hidden, dropout, norm, activation)
        self.out = nn.Linear(out_width(n_latent, hidden), n_output)

    def forward(self, z: Tensor) -> Tensor:
        return self.out(self.body(z))
