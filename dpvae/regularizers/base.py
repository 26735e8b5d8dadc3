"""The regularizer contract and the learned-scale base class."""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any

import torch
from torch import Tensor, nn

from dpvae.errors import check_scale_options

#: every pair ``i < j`` of ``n`` rows, in :func:`torch.pdist`'s order, one tensor per (n, device)
_ALL_PAIRS: dict[tuple[int, str], Tensor] = {}


def all_pairs(n: int, device: torch.device) -> Tensor:
    """Every index pair ``i < j`` of ``n`` rows, shape (2, n(n-1)/2), in :func:`torch.pdist`'s
    order: one shared tensor per batch size and device (the same every step; not to be modified
    in place). Read at these pairs, a pdist output is itself: :func:`read_pairs` skips the gather."""
    key = (n, str(device))
    if key not in _ALL_PAIRS:
        # a normal tensor even when first asked for under inference mode (Lightning's sanity
        # check): training gathers and saves it for the backward pass
        with torch.inference_mode(False):
            pairs = torch.triu_indices(n, n, offset=1, device=device)
        _ALL_PAIRS[key] = pairs
        _ALL_PAIRS[(n, str(pairs.device))] = pairs  # "cuda" asked, "cuda:0" read back
    return _ALL_PAIRS[key]


#: the last pair set :func:`some_pairs` made, its positions in the pdist output over its rows
#: and their number: (pairs, positions, n)
_SOME_PAIRS: list[Any] = []


def some_pairs(keep: Tensor, n: int) -> Tensor:
    """The pairs of :func:`all_pairs` ``(n)`` where the boolean ``keep`` (one per pair) holds,
    their positions remembered: :func:`read_pairs` reads a pdist output there without working
    them out again. A batch with a cell twice in it (a neighbour partner drawn among the sampled
    cells: most batches of a section of a few thousand cells) leaves out the pairs of coincident
    cells so."""
    positions = keep.nonzero().squeeze(1)
    every = all_pairs(n, keep.device)  # its two rows gathered apart: 3x faster than along dim 1
    pairs = torch.stack((every[0].index_select(0, positions), every[1].index_select(0, positions)))
    _SOME_PAIRS[:] = [pairs, positions, n]
    return pairs


def read_pairs(condensed: Tensor, pairs: Tensor, n: int) -> Tensor:
    """A :func:`torch.pdist` output over ``n`` rows read at the pairs' positions; the output
    itself when ``pairs`` is :func:`all_pairs`' tensor (the same values and gradients: an
    identity gather and its scatter, skipped), at the remembered positions when it is the last
    :func:`some_pairs` (the same gather)."""
    if pairs is _ALL_PAIRS.get((n, str(pairs.device))):
        return condensed
    if _SOME_PAIRS and pairs is _SOME_PAIRS[0] and _SOME_PAIRS[2] == n:
        # each position once: index_select's gradient (an index_add into zeros) is the gather's
        return condensed.index_select(0, _SOME_PAIRS[1])
    return condensed[condensed_index(pairs, n)]


def condensed_index(pairs: Tensor, n: int) -> Tensor:
    """Positions of the pairs ``(i, j)``, ``i != j``, in :func:`torch.pdist`'s output over ``n``
    rows (the row-major upper triangle; either order of a pair gives the same position)."""
    i, j = pairs
    a, b = torch.minimum(i, j), torch.maximum(i, j)
    return a * n - ((a * (a + 1)) >> 1) + (b - a - 1)  # a(a+1) is even: the shift halves it


def _has_pdist(x: Tensor) -> bool:
    """Whether :func:`torch.pdist` has a kernel for ``x``'s device (CPU and CUDA)."""
    return x.device.type in ("cpu", "cuda")


#: where each of up to four columns goes in a zero-padded row (:func:`narrow_pdist_width`)
_NARROW_LANES = (0, 4, 2, 1)


@functools.cache
def narrow_pdist_width(columns: int) -> int | None:
    """The padded row width at which :func:`torch.pdist` of a CPU float32 matrix of ``columns``
    (2 to 4) columns is computed faster and bit for bit, or ``None``.

    torch's CPU pdist sums each pair's squared differences in SIMD registers; a row narrower than
    a register (8 floats with AVX2, 16 with AVX-512) takes a partial-load path, 25 ns a pair for
    3 columns against 3 ns for a full register: 0.8 ms for a batch's 32,640 pairs, twice a
    step, against 0.1. The partial path adds the columns in order, ``(c0 + c1) + c2``; a full
    register is summed by halving (lane i with lane i + w/2, then i + w/4, ...), so columns laid
    at lanes 0, 4, 2, 1 among zeros are summed in that same order. Whether it holds (the
    reduction is the CPU build's) is told once per process by comparing both on private random
    rows; where it does not, pdist stays as it is.
    """
    if not 2 <= columns <= len(_NARROW_LANES):
        return None
    width = 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8
    rows = torch.randn(700, columns, generator=torch.Generator().manual_seed(20261207))
    rows = rows * torch.logspace(-3, 3, 700).unsqueeze(1)  # magnitudes apart: rounding shows
    same = torch.equal(torch.pdist(rows), torch.pdist(_pad_columns(rows, width)))
    return width if same else None


def _pad_columns(x: Tensor, width: int) -> Tensor:
    padded = x.new_zeros(x.shape[0], width)
    padded[:, list(_NARROW_LANES[: x.shape[1]])] = x
    return padded


def coordinate_pdist(coords: Tensor) -> Tensor:
    """:func:`torch.pdist` of a batch's coordinates (no gradient), bit for bit, over the padded
    rows of :func:`narrow_pdist_width` where that is faster (2- and 3-D float32 on the CPU)."""
    if coords.device.type == "cpu" and coords.dtype == torch.float32 and not coords.requires_grad:
        width = narrow_pdist_width(coords.shape[1])
        if width is not None:
            return torch.pdist(_pad_columns(coords, width))
    return torch.pdist(coords)


def spatial_distances(coords: Tensor, pairs: Tensor) -> Tensor:
    """Euclidean distances ``|c_i - c_j|`` of the index pairs ``pairs`` (2, P), ``i != j``:
    :func:`torch.pdist` over the rows (:func:`coordinate_pdist`) read at the pairs' positions
    (gathered rows where pdist has no kernel)."""
    if _has_pdist(coords):
        return read_pairs(coordinate_pdist(coords), pairs, coords.shape[0])
    return torch.linalg.vector_norm(coords[pairs[0]] - coords[pairs[1]], dim=-1)


def pair_distances(
    z: Tensor, coords: Tensor, pairs: Tensor, eps: float = 1e-10
) -> tuple[Tensor, Tensor]:
    """Latent and spatial Euclidean distances of the index pairs ``pairs`` (2, P), ``i != j``.

    The latent distance is ``sqrt(|z_i - z_j|^2 + eps)`` so its gradient stays finite when two
    codes coincide. Both come from :func:`torch.pdist` over the batch, read at the pairs'
    positions: one fused kernel (and its backward) instead of gathering two (P, L) blocks of rows
    and scattering their gradients back, 6x faster for a batch's 32,640 pairs.
    """
    if _has_pdist(z):
        dz = torch.sqrt(read_pairs(torch.pdist(z), pairs, z.shape[0]) ** 2 + eps)
    else:
        dz = torch.sqrt(((z[pairs[0]] - z[pairs[1]]) ** 2).sum(dim=-1) + eps)
    return dz, spatial_distances(coords, pairs)


def weighted_mean(values: Tensor, weight: Tensor | None) -> Tensor:
    """``sum(weight * values) / sum(weight)``; the plain mean when ``weight`` is ``None``."""
    if weight is None:
        return values.mean()
    return (values * weight).sum() / weight.sum().clamp_min(1e-30)


def accepts_weight(regularizer: nn.Module) -> bool:
    """Whether ``regularizer.forward`` takes a ``weight`` keyword (or ``**kwargs``)."""
    try:
        params = inspect.signature(regularizer.forward).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False
    return any(p.name == "weight" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class DistanceRegularizer(nn.Module):
    """Base class of distance regularizers.

    Contract:
        * ``__init__(**options)``; every option has a default.
        * ``forward(z, coords, pairs, weight=None)`` returns a scalar loss >= 0 that is 0 when
          latent distances are exactly proportional (or equal, for forms without a scale) to
          spatial distances on the given pairs. ``z`` (B, L) are the cells' latent codes,
          ``coords`` (B, D) their standardised coordinates (one scale for all axes), ``pairs``
          (2, P) index pairs into the batch with distinct positions (P >= 1). The datamodule builds
          batches so that ``pairs`` holds both random far pairs and spatial-neighbour pairs.
          ``weight`` (P,) holds each pair's non-negative weight (``None``: equal weights); a form
          that averages over pairs should take the weighted mean (:func:`weighted_mean`), so that
          the pair set's weights (e.g. the share of the neighbour pairs, ``data.near_weight``)
          take effect. ``weight`` is optional: a ``forward(z, coords, pairs)`` without it keeps
          working, and the model then hands it, when the batch's pairs are weighted, as many pairs
          drawn (with replacement) in proportion to their weights, which gives the weighted term
          in expectation.
        * ``scale()`` returns lambda, the learned latent-per-spatial scale, as a 0-d tensor, or
          ``None`` for a scale-free form; ``reset_scale(value)`` sets it (the model calls it once
          when the regularizer switches on after the warm-up, with the median latent/spatial ratio).
    """

    def forward(  # pragma: no cover
        self, z: Tensor, coords: Tensor, pairs: Tensor, weight: Tensor | None = None
    ) -> Tensor:
        raise NotImplementedError

    def scale(self) -> Tensor | None:
        """The learned latent-per-spatial scale lambda, or ``None``."""
        return None

    def reset_scale(self, value: float) -> None:
        """Set lambda (no-op for scale-free forms)."""


class ScaledDistanceRegularizer(DistanceRegularizer):
    """A regularizer with a learned scale lambda, stored in log space and clamped.

    Args:
        init_scale: initial lambda (re-initialised when the regularizer switches on).
        min_scale, max_scale: clamp of lambda.
        learn_scale: learn lambda by gradient descent (else keep it fixed after the reset).
    """

    def __init__(
        self,
        init_scale: float = 1.0,
        min_scale: float = 1e-3,
        max_scale: float = 1e3,
        learn_scale: bool = True,
    ) -> None:
        super().__init__()
        check_scale_options(init_scale=init_scale, min_scale=min_scale, max_scale=max_scale)
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)), requires_grad=learn_scale)
        self.log_min = math.log(min_scale)
        self.log_max = math.log(max_scale)

    def scale(self) -> Tensor:
        return torch.exp(self.log_scale.clamp(self.log_min, self.log_max))

    def reset_scale(self, value: float) -> None:
        clamped = min(max(math.log(max(value, 1e-30)), self.log_min), self.log_max)
        with torch.no_grad():
            self.log_scale.fill_(clamped)
