"""What a model must repeat at prediction time: gene order, normalisation, coordinate frame.

:class:`Preprocessor` is learned from the reference cells only (gene selection, per-gene centring and
scaling, the coordinate centre and its single scale) and is stored in the checkpoint as plain data,
so a trained model predicts on a new file with no datamodule and no training config around.
:class:`ExpressionTransform` is its torch half, applied to every batch of raw expression inside the
model, on whatever device the model lives on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from itertools import pairwise
from typing import Any

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import torch
from torch import Tensor, nn

from dpvae.errors import DataError
from dpvae.io import iter_row_chunks

TARGET_SUM = 1e4
_ARRAYS = ("pca_components", "neighbour_components")


@dataclass
class Preprocessor:
    """Expression and coordinate preprocessing learned on the reference.

    Attributes:
        genes: the model's genes, in its input order.
        count_data: every value of the reference matrix is a non-negative integer.
        normalize: divide each cell by its total over ``genes`` and multiply by ``target_sum``.
        log1p: apply ``log(1 + x)`` after normalisation.
        gene_mean, gene_std: per-gene centring and scaling of the transformed values (empty: none).
        coord_center: the reference's coordinate centroid (original units).
        coord_scale: one scale for all axes (original units per model unit), so distances keep
            their ratios.
        ref_nn_distance: the reference's median nearest-neighbour distance (original units).
        n_pcs: when > 0, the encoder sees the first ``n_pcs`` principal components of the
            transformed expression (loadings fitted on the reference, kept in the model's state).
        neighbour_pcs: when > 0, prediction's neighbour search joins this many principal
            components of the log-normalised expression (not scaled per gene; loadings fitted on
            the reference) to the latent code.
        sections: a reference of several sections: their names, in order (empty: one section).
        section_centers: each section's coordinate centroid (original units; its own frame);
            ``coord_center`` is the first section's, and ``coord_scale`` is common to all.
    """

    genes: list[str]
    count_data: bool
    normalize: bool
    log1p: bool
    target_sum: float = TARGET_SUM
    gene_mean: list[float] = field(default_factory=list)
    gene_std: list[float] = field(default_factory=list)
    coord_center: list[float] = field(default_factory=list)
    coord_scale: float = 1.0
    ref_nn_distance: float = 1.0
    n_pcs: int = 0
    neighbour_pcs: int = 0
    sections: list[str] = field(default_factory=list)
    section_centers: list[list[float]] = field(default_factory=list)
    #: (G, n_pcs) loadings of the encoder's input PCA, and (G, neighbour_pcs) of the neighbour
    #: search's expression PCs, as fitted; the model copies them into its state (they are not part
    #: of :meth:`to_dict`, so checkpoint hyperparameters stay small).
    pca_components: np.ndarray | None = field(default=None, repr=False, compare=False)
    neighbour_components: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def spatial_dim(self) -> int:
        """Number of spatial axes (2 or 3)."""
        return len(self.coord_center)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, safe to store in a checkpoint's hyperparameters (no loadings)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _ARRAYS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessor:
        """Inverse of :meth:`to_dict` (loadings then come from the model's state)."""
        return cls(**{k: v for k, v in data.items() if k not in _ARRAYS})

    def center_of(self, section: str | None = None) -> np.ndarray:
        """The coordinate centre of ``section`` (``None``: the first, or the only one)."""
        if section is None or not self.sections:
            return np.asarray(self.coord_center, dtype=np.float64)
        if section not in self.sections:
            raise DataError(
                f"no section {section!r} in this model's reference (sections: "
                f"{', '.join(self.sections)})"
            )
        return np.asarray(self.section_centers[self.sections.index(section)], dtype=np.float64)

    def coords_to_model(self, coords: np.ndarray, section: str | None = None) -> np.ndarray:
        """Original coordinates (of ``section``'s frame) -> the model's standardised frame."""
        return (np.asarray(coords, dtype=np.float64) - self.center_of(section)) / self.coord_scale

    def coords_from_model(self, coords: np.ndarray, section: str | None = None) -> np.ndarray:
        """The model's standardised frame -> original coordinates (of ``section``'s frame)."""
        return np.asarray(coords, dtype=np.float64) * self.coord_scale + self.center_of(section)


def to_dense(block: Any) -> np.ndarray:
    """A sparse or dense block of rows as a dense float64 array."""
    return np.asarray(block.toarray() if sp.issparse(block) else block, dtype=np.float64)


def _log_transform(
    block: np.ndarray, totals: np.ndarray, normalize: bool, log1p: bool
) -> np.ndarray:
    x = block
    if normalize:
        x = x / np.maximum(totals, 1e-12)[:, None] * TARGET_SUM
    if log1p:
        x = np.log1p(np.maximum(x, 0.0))
    return x


def scan_matrix(
    matrix: Any, rows: np.ndarray, gene_mask: np.ndarray, chunk_size: int
) -> dict[str, np.ndarray | bool | float]:
    """One chunked pass over the kept rows and genes: cell totals, integer check, minimum."""
    totals = np.zeros(len(rows))
    is_integer = True
    minimum = np.inf
    pos = 0
    cols = np.flatnonzero(gene_mask)
    for idx, block in iter_row_chunks(matrix, chunk_size, rows):
        block = block[:, cols]
        values = np.asarray(block.data if sp.issparse(block) else block).ravel()
        if values.size:
            minimum = min(minimum, float(values.min()))
            if is_integer and not np.all(np.isfinite(values) & (values == np.round(values))):
                is_integer = False
            if not np.all(np.isfinite(values)):
                raise DataError(
                    "the expression matrix holds NaN or infinite values; remove or fill them first"
                )
        totals[pos : pos + len(idx)] = np.asarray(block.sum(axis=1)).ravel()
        pos += len(idx)
    if not np.isfinite(minimum):
        minimum = 0.0
    return {"totals": totals, "is_integer": is_integer, "minimum": minimum}


@dataclass
class MatrixPart:
    """One section's expression as the preprocessing fit reads it, in row chunks.

    Attributes:
        matrix: cells x genes of the file (dense, sparse or backed).
        rows: the section's usable rows (file row ids, increasing).
        cols: the file column of each candidate gene, in the reference's common gene order.
        totals: each usable row's total over the candidate genes.
    """

    matrix: Any
    rows: np.ndarray
    cols: np.ndarray
    totals: np.ndarray


Blocks = Callable[[], Iterator[sp.csr_matrix]]


def part_blocks(
    parts: Sequence[MatrixPart],
    genes: np.ndarray,
    which: Sequence[np.ndarray] | None = None,
    chunk_size: int = 2000,
) -> Blocks:
    """Chunks of ``parts`` as float32 CSR blocks of the candidate genes at positions ``genes``.

    ``which[p]`` (increasing positions in ``parts[p].rows``) restricts the rows read; blocks
    never span two parts and hold at most ``chunk_size`` rows. Returns a function that starts a
    new pass each time it is called.
    """

    def blocks() -> Iterator[sp.csr_matrix]:
        for p, part in enumerate(parts):
            rows = part.rows if which is None else part.rows[which[p]]
            cols = part.cols[genes]
            for _, block in iter_row_chunks(part.matrix, chunk_size, rows):
                yield sp.csr_matrix(block[:, cols], dtype=np.float32)

    return blocks


def _as_blocks(raw: Any, chunk_size: int) -> Blocks:
    if callable(raw):
        return raw  # type: ignore[no-any-return]

    def blocks() -> Iterator[sp.csr_matrix]:
        for start in range(0, raw.shape[0], chunk_size):
            yield raw[start : start + chunk_size]

    return blocks


def select_genes(
    parts: Sequence[MatrixPart],
    n_genes: int,
    normalize: bool,
    log1p: bool,
    chunk_size: int,
) -> np.ndarray:
    """Positions (into the candidate genes, increasing) of the ``n_genes`` most variable ones.

    Variability is the variance of the normalised, log-transformed expression over every usable
    cell of every part, accumulated in one chunked pass.
    """
    n_candidates = len(parts[0].cols)
    if n_genes <= 0 or n_genes >= n_candidates:
        return np.arange(n_candidates)
    s1 = np.zeros(n_candidates)
    s2 = np.zeros(n_candidates)
    n = 0
    for part in parts:
        pos = 0
        for idx, block in iter_row_chunks(part.matrix, chunk_size, part.rows):
            block = block[:, part.cols]
            dense = to_dense(block)
            totals = part.totals[pos : pos + len(idx)]
            x = _log_transform(dense.astype(np.float64), totals, normalize, log1p)
            s1 += x.sum(axis=0)
            s2 += (x * x).sum(axis=0)
            pos += len(idx)
        n += len(part.rows)
    n = max(n, 1)
    var = s2 / n - (s1 / n) ** 2
    top = np.argsort(-var, kind="stable")[:n_genes]
    return np.sort(top)


def extract_rows(matrix: Any, rows: np.ndarray, cols: np.ndarray, chunk_size: int) -> sp.csr_matrix:
    """The given rows and columns as one float32 CSR matrix, read chunk by chunk."""
    blocks = []
    for _, block in iter_row_chunks(matrix, chunk_size, rows):
        blocks.append(sp.csr_matrix(block[:, cols], dtype=np.float32))
    if not blocks:
        return sp.csr_matrix((0, len(cols)), dtype=np.float32)
    return sp.vstack(blocks, format="csr")


#: the principal components are fitted on at most this many training cells (a seeded random
#: subset above it, its covariance accumulated in float32 blocks and its top eigenpairs found by
#: Lanczos iteration): the G x G covariance of 50k cells pins the leading components as well as a
#: million cells do, and setup no longer grows with the reference for them
PCA_MAX_CELLS = 50_000


def principal_components(
    raw: Any,
    transform: ExpressionTransform,
    n_pcs: int,
    chunk_size: int = 10_000,
    shape: tuple[int, int] | None = None,
    fast: bool = False,
) -> np.ndarray:
    """Loadings (G, n_pcs) of the top principal components of ``transform(raw)``.

    ``raw``: a cells x genes matrix, or a function starting a pass over its row blocks
    (:func:`part_blocks`; then ``shape`` gives their total shape). ``fast`` (for a large
    reference's subsample) accumulates the covariance from float32 block products and finds only
    the top eigenpairs by Lanczos iteration. With more cells than genes, from the G x G covariance accumulated chunk
    by chunk (no dense n x G copy) and only its top eigenpairs; with fewer cells (a small array),
    from the n x n Gram matrix of the centred cells, which is cheaper and no larger.
    """
    blocks = _as_blocks(raw, chunk_size)
    n, g = shape if shape is not None else _count_rows(blocks) if callable(raw) else raw.shape
    k = min(n_pcs, g, max(n, 1))

    def transformed(block: sp.csr_matrix) -> np.ndarray:
        x = torch.as_tensor(block.toarray(), dtype=torch.float32)
        return transform(x)[0].double().numpy()

    if n < g:
        parts = list(blocks())
        x = transformed(sp.vstack(parts, format="csr") if len(parts) > 1 else parts[0])
        x -= x.mean(axis=0)
        vals, vecs = scipy.linalg.eigh(x @ x.T, subset_by_index=[n - k, n - 1])
        top = x.T @ vecs[:, ::-1]
        top /= np.maximum(np.linalg.norm(top, axis=0), 1e-12)
    else:
        s1 = np.zeros(g)
        cov = np.zeros((g, g))
        for block in blocks():
            x = transformed(block)
            s1 += x.sum(axis=0)
            if fast:
                x32 = x.astype(np.float32)
                cov += x32.T @ x32
            else:
                cov += x.T @ x
        mean = s1 / max(n, 1)
        cov = cov / max(n, 1) - np.outer(mean, mean)
        if fast and k < g - 1:
            from scipy.sparse.linalg import eigsh

            vals, vecs = eigsh(cov, k=k, which="LA", v0=np.ones(g))
            vecs = vecs[:, np.argsort(vals)]
        else:
            vals, vecs = scipy.linalg.eigh(cov, subset_by_index=[g - k, g - 1])
        top = vecs[:, ::-1]
    signs = np.sign(top[np.abs(top).argmax(axis=0), range(top.shape[1])])  # deterministic signs
    return top * signs


def _count_rows(blocks: Blocks) -> tuple[int, int]:
    n, g = 0, 0
    for block in blocks():
        n += block.shape[0]
        g = block.shape[1]
    return n, g


def gene_moments(
    raw: Any, normalize: bool, log1p: bool, chunk_size: int = 10_000
) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and standard deviation of the transformed expression of ``raw``.

    ``raw``: a cells x genes matrix, or a function starting a pass over its row blocks.
    """
    s1: np.ndarray | None = None
    s2: np.ndarray | None = None
    n = 0
    for block in _as_blocks(raw, chunk_size)():
        dense = block.toarray().astype(np.float64)
        x = _log_transform(dense, dense.sum(axis=1), normalize, log1p)
        if s1 is None:
            s1, s2 = np.zeros(x.shape[1]), np.zeros(x.shape[1])
        s1 += x.sum(axis=0)
        s2 += (x * x).sum(axis=0)  # type: ignore[operator]
        n += len(x)
    if s1 is None or s2 is None:
        return np.zeros(0), np.zeros(0)
    mean = s1 / max(n, 1)
    std = np.sqrt(np.maximum(s2 / max(n, 1) - mean**2, 0.0))
    return mean, np.where(std > 1e-8, std, 1.0)


# fewest training cells per expression principal component of the neighbour search
CELLS_PER_NEIGHBOUR_PC = 40
# targeted panels of at most this many genes keep every component in the neighbour search
FULL_RANK_PANEL = 50


def neighbour_components(requested: int, n_genes: int, n_train: int) -> int:
    """How many expression PCs join the latent code in the neighbour search.

    On a transcriptome-wide panel the leading components carry the tissue's expression programmes
    and the trailing ones mostly noise, and a small array cannot estimate many (on the dev data
    10-15 components placed cells better than 30-50, see BENCHMARKS.md): ``requested`` of them, at
    most one per ``CELLS_PER_NEIGHBOUR_PC`` training cells. A targeted panel of at most
    ``FULL_RANK_PANEL`` genes (smFISH, MERFISH-like) has little such noise and keeps every one.
    """
    if requested <= 0:
        return 0
    wanted = n_genes if n_genes <= FULL_RANK_PANEL else requested
    return min(wanted, n_genes, max(n_train // CELLS_PER_NEIGHBOUR_PC, 1))


def fit_frame(
    coords: np.ndarray,
    train: np.ndarray,
    sections: Sequence[str] = (),
    section_of: np.ndarray | None = None,
) -> tuple[np.ndarray, float, float]:
    """The coordinate frame of the training cells ``coords[train]``.

    Returns (each section's centre (S, D), one scale common to all sections (the root mean
    square of the centred coordinates), the median nearest-neighbour distance within sections).

    Raises:
        DataError: a section without training cells, or every cell at the same position.
    """
    from scipy.spatial import cKDTree

    codes = np.zeros(len(coords), dtype=np.int64) if section_of is None else section_of
    n_sections = max(len(sections), 1)
    centers = np.zeros((n_sections, coords.shape[1]))
    nn_dist = []
    train_codes = codes[train]
    train_coords = coords[train]
    for s in range(n_sections):
        mine = train_coords[train_codes == s]
        if len(mine) == 0:
            raise DataError(f"section {sections[s]!r} has no training cells; it is too small")
        centers[s] = mine.mean(axis=0)
        if len(mine) > 1:
            tree = cKDTree(mine)
            for start in range(0, len(mine), 65_536):  # bounded (distance, index) blocks
                nn_dist.append(tree.query(mine[start : start + 65_536], k=2)[0][:, 1])
    spread = float(np.sqrt(np.mean((train_coords - centers[train_codes]) ** 2)))
    if not spread > 0:
        raise DataError("all reference cells sit at the same position; coordinates are needed")
    nn_distance = float(np.median(np.concatenate(nn_dist))) if nn_dist else 1.0
    return centers, spread, nn_distance


def fit_preprocessor(
    parts: Sequence[MatrixPart],
    gene_names: Sequence[str],
    train: np.ndarray,
    coords: np.ndarray,
    *,
    count_data: bool,
    normalize: bool,
    log1p: bool,
    sections: Sequence[str] = (),
    section_of: np.ndarray | None = None,
    n_genes: int = 2000,
    scale: bool = True,
    n_pcs: int = 0,
    neighbour_pcs: int = 15,
    chunk_size: int = 2000,
    seed: int = 0,
) -> tuple[Preprocessor, np.ndarray]:
    """The one preprocessing fit: gene selection, normalisation, coordinate frame, PCA loadings.

    Reads the parts' matrices (in memory or backed, one per section) in row chunks, never holding
    more than a chunk of expression: the ``n_genes`` most variable candidate genes over every
    usable cell (:func:`select_genes`), then, on the training cells only, the per-gene moments of
    the transformed expression, each section's coordinate centre with one scale common to all,
    the median nearest-neighbour distance (within sections) and the principal-component loadings
    of the encoder input (``n_pcs``) and of the neighbour search (:func:`neighbour_components`),
    the latter from at most :data:`PCA_MAX_CELLS` training cells.

    Args:
        parts: one :class:`MatrixPart` per section, in order.
        gene_names: the candidate genes (the parts' common order).
        train: positions of the training cells among all usable cells (the parts' usable rows
            concatenated), increasing.
        coords: (n_usable, D) coordinates, each section in its own frame.
        count_data, normalize, log1p: what the data are and how they are transformed.
        sections, section_of: the sections' names and each usable cell's section (code into
            ``sections``) for a reference of several sections.
        seed: seed of the PCA subset of a large reference.

    Returns:
        (the fitted :class:`Preprocessor`, carrying its loadings; the positions of the selected
        genes among the candidates, increasing).
    """
    selected = select_genes(parts, n_genes, normalize, log1p, chunk_size)
    sizes = np.array([len(p.rows) for p in parts])
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    centers, spread, nn_distance = fit_frame(coords, train, sections, section_of)

    def train_blocks(positions: np.ndarray) -> Blocks:
        which = [
            positions[(positions >= lo) & (positions < hi)] - lo for lo, hi in pairwise(offsets)
        ]
        return part_blocks(parts, selected, which, chunk_size)

    if scale:
        mean, std = gene_moments(train_blocks(train), normalize, log1p, chunk_size)
    else:
        mean, std = np.zeros(0), np.zeros(0)
    genes = [str(g) for g in np.asarray(gene_names)[selected]]
    n_train = len(train)
    pre = Preprocessor(
        genes=genes,
        count_data=count_data,
        normalize=normalize,
        log1p=log1p,
        gene_mean=mean.tolist(),
        gene_std=std.tolist(),
        coord_center=centers[0].tolist(),
        coord_scale=spread,
        ref_nn_distance=nn_distance,
        n_pcs=min(n_pcs, len(genes), max(n_train - 1, 1)) if n_pcs > 0 else 0,
        neighbour_pcs=neighbour_components(neighbour_pcs, len(genes), n_train),
        sections=[str(s) for s in sections] if len(sections) > 1 else [],
        section_centers=centers.tolist() if len(sections) > 1 else [],
    )
    pca_cells = train
    if n_train > PCA_MAX_CELLS:
        rng = np.random.default_rng([seed, 17])
        pca_cells = np.sort(rng.choice(train, PCA_MAX_CELLS, replace=False))
    if pre.n_pcs:
        pre.pca_components = principal_components(
            train_blocks(pca_cells),
            ExpressionTransform.from_preprocessor(pre),
            pre.n_pcs,
            shape=(len(pca_cells), len(genes)),
            fast=len(pca_cells) < n_train,
        )
    if pre.neighbour_pcs:
        pre.neighbour_components = principal_components(
            train_blocks(pca_cells),
            ExpressionTransform(normalize, log1p),  # log-normalised, not scaled per gene
            pre.neighbour_pcs,
            shape=(len(pca_cells), len(genes)),
            fast=len(pca_cells) < n_train,
        )
    return pre, selected


class ExpressionTransform(nn.Module):
    """Raw expression (B, G) -> (model input (B, G), library size (B, 1)).

    Library size is the cell's total over the model's genes. The input is that total-normalised
    (when ``normalize``), ``log1p``-transformed (when ``log1p``) and, when per-gene moments are
    given, centred, scaled and clipped to +-``clip``.
    """

    gene_mean: Tensor
    gene_std: Tensor
    pca: Tensor
    neighbour_pca: Tensor

    def __init__(
        self,
        normalize: bool,
        log1p: bool,
        target_sum: float = TARGET_SUM,
        gene_mean: Sequence[float] = (),
        gene_std: Sequence[float] = (),
        clip: float = 10.0,
        n_pcs: int = 0,
        n_genes: int = 0,
        neighbour_pcs: int = 0,
    ) -> None:
        super().__init__()
        self.normalize = normalize
        self.log1p = log1p
        self.target_sum = target_sum
        self.clip = clip
        self.scale = len(gene_mean) > 0
        self.register_buffer("gene_mean", torch.tensor(list(gene_mean), dtype=torch.float32))
        self.register_buffer("gene_std", torch.tensor(list(gene_std), dtype=torch.float32))
        self.n_pcs = n_pcs
        self.neighbour_pcs = neighbour_pcs
        self.n_genes = n_genes or len(gene_mean)
        # PCA loadings, filled from the reference and then saved in the state dict: ``pca``
        # (G, n_pcs) of the scaled input for the encoder, ``neighbour_pca`` (G, neighbour_pcs) of
        # the unscaled log-normalised expression for prediction's neighbour search. The second
        # exists only when used, so checkpoints without it load unchanged.
        self.register_buffer("pca", torch.zeros(self.n_genes if n_pcs else 0, n_pcs))
        if neighbour_pcs:
            self.register_buffer("neighbour_pca", torch.zeros(self.n_genes, neighbour_pcs))

    @classmethod
    def from_preprocessor(cls, pre: Preprocessor) -> ExpressionTransform:
        """Build the transform a :class:`Preprocessor` describes, with its fitted loadings."""
        out = cls(
            pre.normalize,
            pre.log1p,
            pre.target_sum,
            pre.gene_mean,
            pre.gene_std,
            n_pcs=pre.n_pcs,
            n_genes=len(pre.genes),
            neighbour_pcs=pre.neighbour_pcs,
        )
        with torch.no_grad():
            if pre.pca_components is not None:
                out.pca.copy_(torch.as_tensor(pre.pca_components, dtype=torch.float32))
            if pre.neighbour_components is not None:
                out.neighbour_pca.copy_(
                    torch.as_tensor(pre.neighbour_components, dtype=torch.float32)
                )
        return out

    def loadings_fitted(self) -> bool:
        """Whether every PCA this transform uses holds fitted loadings (not the zero placeholder)."""
        ok = not self.n_pcs or bool(self.pca.any())
        return ok and (not self.neighbour_pcs or bool(self.neighbour_pca.any()))

    def encoder_input(self, x: Tensor) -> Tensor:
        """What the encoder sees: ``x`` itself, or its principal components."""
        return x @ self.pca[:, : self.n_pcs] if self.n_pcs else x

    def expression_pcs(self, raw: Tensor) -> Tensor:
        """Raw expression (B, G) -> its ``neighbour_pcs`` log-normalised principal components.

        Not centred: only differences between cells matter to a neighbour search.
        """
        return self.log_normalise(raw)[0] @ self.neighbour_pca

    # Expression is data: without a graph (no input requiring gradients) each operation after the
    # first writes into the tensor the first made, the same values bit for bit without a new
    # (B, G) tensor per operation (on a 256 x 2000 batch 1.0 ms instead of 1.45 a step).

    def log_normalise(self, raw: Tensor) -> tuple[Tensor, Tensor]:
        """Raw expression (B, G) -> (normalised, log-transformed values, library size (B, 1))."""
        library = raw.sum(dim=1, keepdim=True)
        x = raw
        if raw.requires_grad:
            if self.normalize:
                x = x / library.clamp_min(1e-12) * self.target_sum
            if self.log1p:
                x = torch.log1p(x.clamp_min(0.0))
            return x, library
        if self.normalize:
            x = (x / library.clamp_min(1e-12)).mul_(self.target_sum)
        if self.log1p:
            x = x.clamp_min_(0.0) if x is not raw else x.clamp_min(0.0)
            x.log1p_()
        return x, library

    def forward(self, raw: Tensor) -> tuple[Tensor, Tensor]:
        x, library = self.log_normalise(raw)
        if not self.scale:
            return x, library
        if raw.requires_grad or torch.result_type(x, self.gene_mean) != x.dtype:
            return ((x - self.gene_mean) / self.gene_std).clamp(-self.clip, self.clip), library
        x = x - self.gene_mean if x is raw else x.sub_(self.gene_mean)
        return x.div_(self.gene_std).clamp_(-self.clip, self.clip), library
