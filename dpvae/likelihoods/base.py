"""The likelihood contract."""

from __future__ import annotations

from torch import Tensor, nn


class Likelihood(nn.Module):
    """Base class of likelihoods.

    Contract:
        * ``__init__(n_genes, **options)``; every option has a default. Gene-wise free parameters
          (a variance, a dispersion) are this module's own parameters.
        * ``n_params``: how many values per gene the decoder must produce; the decoder's output of
          shape (B, n_params * n_genes) is split into ``n_params`` blocks of ``n_genes``.
        * ``requires_counts``: ``True`` when the target is raw, non-negative integer counts (the
          datamodule then checks the data); ``False`` when it is the model's transformed input.
        * ``nll(decoded, target, library)`` returns the negative log-likelihood of each cell,
          summed over genes, shape (B,). ``library`` (B, 1) is each cell's total count over the
          model's genes.
    """

    n_params: int = 1
    requires_counts: bool = False

    def __init__(self, n_genes: int) -> None:
        super().__init__()
        self.n_genes = n_genes

    def nll(self, decoded: Tensor, target: Tensor, library: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def split(self, decoded: Tensor) -> list[Tensor]:
        """The decoder's output as ``n_params`` tensors of shape (B, n_genes)."""
        return list(decoded.split(self.n_genes, dim=-1))
