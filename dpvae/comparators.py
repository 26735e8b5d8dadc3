"""Comparator methods for the spatial-reconstruction benchmark (see ``../shared/BENCHMARK.md``).

Every comparator has the same signature as the dp-VAE entry point::

    method(ref: AnnData, query: AnnData, seed: int) -> np.ndarray  # (n_query, spatial_dim)

``ref`` carries expression in ``X`` and coordinates in ``obsm['spatial']``; ``query`` carries
expression only, with the same genes in the same order. Everything (normalisation, gene selection,
PCA) is learned from the reference cells alone.

Two baselines are implemented here with numpy/scipy only:

* :func:`knn_regression` -- log-normalise, top 2000 highly variable genes (Seurat dispersion
  flavour, as ``scanpy.pp.highly_variable_genes`` by default), PCA to 50 on the reference, and the
  mean coordinates of the 10 nearest reference cells in PCA space.
* :func:`pca_mds` -- the same PCA, then classical MDS of the query cells to the spatial dimension.

The published tools CeLEry, Tangram and novoSpaRc are wrapped by :func:`celery`, :func:`tangram`
and :func:`novosparc`. They are an optional extra: each imports its package lazily and raises
:class:`NotInstalledError` when the package is absent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial import cKDTree

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "COMPARATORS",
    "NotInstalledError",
    "Preprocessor",
    "celery",
    "classical_mds",
    "fit_preprocessor",
    "highly_variable_genes",
    "is_count_matrix",
    "knn_regression",
    "log_normalize",
    "novosparc",
    "pca_mds",
    "tangram",
]

#: A cells x genes matrix: a numpy array or a scipy sparse matrix/array.
Matrix: TypeAlias = Any


class NotInstalledError(ImportError):
    """Raised by a wrapper when its published tool is not importable."""


# --------------------------------------------------------------------------------------------
# Preprocessing shared by the baselines
# --------------------------------------------------------------------------------------------


def is_count_matrix(X: Matrix) -> bool:
    """Return True when every stored value of ``X`` is an integer (the protocol's count test)."""
    data = X.data if sp.issparse(X) else np.asarray(X)
    if data.size == 0:
        return True
    return bool(np.all(np.isfinite(data)) and np.all(data == np.round(data)))


def log_normalize(X: Matrix, counts: bool, target_sum: float = 1e4) -> Matrix:
    """``log1p(normalise_total(X, target_sum))`` for count data, ``log1p(X)`` otherwise.

    Sparse input stays sparse (only the stored values are transformed); the result is float64.
    Cells with zero total are left at zero rather than divided by zero.
    """
    if sp.issparse(X):
        out = sp.csr_matrix(X, dtype=np.float64, copy=True)
        if counts:
            totals = np.asarray(out.sum(axis=1)).ravel()
            scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
            out = sp.csr_matrix(sp.diags(scale) @ out)
        np.log1p(out.data, out=out.data)
        return out
    dense = np.array(X, dtype=np.float64, copy=True)
    if counts:
        totals = dense.sum(axis=1, keepdims=True)
        scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
        dense *= scale
    return np.log1p(dense)


def _column_mean_var(X: Matrix) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and unbiased (ddof=1) variance, sparse-friendly, in float64."""
    n = X.shape[0]
    if sp.issparse(X):
        Xc = sp.csr_matrix(X, dtype=np.float64)
        mean = np.asarray(Xc.mean(axis=0)).ravel()
        sq = np.asarray(Xc.multiply(Xc).mean(axis=0)).ravel()
    else:
        Xd = np.asarray(X, dtype=np.float64)
        mean = Xd.mean(axis=0)
        sq = (Xd * Xd).mean(axis=0)
    var = (sq - mean**2) * (n / max(n - 1, 1))
    return mean, np.maximum(var, 0.0)


def highly_variable_genes(
    X_log: Matrix, n_top: int = 2000, flavor: str = "variance", n_bins: int = 20
) -> np.ndarray:
    """Indices (ascending) of the ``n_top`` most variable genes of log-normalised data.

    ``flavor="variance"`` (the default, and what reproduces ANCHORS.md) ranks genes by the
    variance of the log-normalised values and keeps the top ``n_top`` (ties by gene order).

    ``flavor="seurat"`` is the Seurat dispersion flavour (Satija et al. 2015), as scanpy's
    ``highly_variable_genes`` default: on ``expm1`` of the log data compute each gene's mean and
    variance, the log dispersion ``log(var / mean)`` and the ``log1p`` mean; cut the means into
    ``n_bins`` equal-width bins and z-score the dispersions within each bin (a bin holding a single
    gene gives it a normalised dispersion of 1); keep the genes whose normalised dispersion is at
    least the ``n_top``-th largest. Genes that never vary are never selected.

    When there are no more than ``n_top`` genes, all are returned.
    """
    n_genes = X_log.shape[1]
    if n_genes <= n_top:
        return np.arange(n_genes)
    if flavor == "variance":
        _, var = _column_mean_var(X_log)
        return np.sort(np.argsort(-var, kind="stable")[:n_top])
    if flavor != "seurat":
        raise ValueError(f"unknown flavor {flavor!r}; valid: 'variance', 'seurat'")
    if sp.issparse(X_log):
        X = sp.csr_matrix(X_log, dtype=np.float64, copy=True)
        np.expm1(X.data, out=X.data)
    else:
        X = np.expm1(np.asarray(X_log, dtype=np.float64))
    mean, var = _column_mean_var(X)
    mean[mean == 0] = 1e-12
    dispersion = var / mean
    dispersion[dispersion == 0] = np.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersion = np.log(dispersion)
    mean = np.log1p(mean)

    df = pd.DataFrame({"mean": mean, "disp": dispersion})
    df["bin"] = pd.cut(df["mean"], bins=n_bins)
    stats = df.groupby("bin", observed=True)["disp"].agg(avg="mean", dev="std")
    single = stats["dev"].isna()
    stats.loc[single, "dev"] = stats.loc[single, "avg"]
    stats.loc[single, "avg"] = 0.0
    per_gene = stats.loc[df["bin"]]
    norm = (df["disp"].to_numpy() - per_gene["avg"].to_numpy()) / per_gene["dev"].to_numpy()

    finite = norm[~np.isnan(norm)]
    if finite.size == 0:
        return np.arange(min(n_top, n_genes))
    k = min(n_top, finite.size)
    cutoff = np.sort(finite)[::-1][k - 1]
    return np.flatnonzero(np.nan_to_num(norm, nan=-np.inf) >= cutoff)


@dataclass
class Preprocessor:
    """What the baselines learn from the reference: the transform, genes and PCA."""

    counts: bool
    genes: np.ndarray
    mean: np.ndarray
    components: np.ndarray  # (n_genes_selected, n_comps)
    explained_variance: np.ndarray

    def transform(self, X: Matrix) -> np.ndarray:
        """Log-normalise ``X`` (full gene set, reference order), select genes, project on PCs."""
        X_log = log_normalize(X, self.counts)[:, self.genes]
        proj = X_log @ self.components
        proj = np.asarray(proj.toarray() if sp.issparse(proj) else proj)
        return proj - self.mean @ self.components


def _top_eigvecs(C: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` eigenpairs of a symmetric matrix, eigenvalues descending."""
    vals, vecs = np.linalg.eigh(C)
    order = np.argsort(vals)[::-1][:k]
    return vals[order], vecs[:, order]


class _Centered:
    """The column-centred matrix ``X - 1 mean^T`` as an operator; a sparse ``X`` stays sparse."""

    def __init__(self, X: Matrix, mean: np.ndarray) -> None:
        self.X = sp.csr_matrix(X, dtype=np.float64) if sp.issparse(X) else np.asarray(X, float)
        self.mean = mean
        self.shape = X.shape

    def matmul(self, Q: np.ndarray) -> np.ndarray:
        """``(X - 1 mean^T) @ Q``."""
        return np.asarray(self.X @ Q) - (self.mean @ Q)[None, :]

    def rmatmul(self, Q: np.ndarray) -> np.ndarray:
        """``(X - 1 mean^T)^T @ Q``."""
        return np.asarray(self.X.T @ Q) - np.outer(self.mean, Q.sum(axis=0))


def _randomized_components(
    A: _Centered, k: int, random_state: int = 0, n_oversamples: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` right singular vectors and values of ``A`` by randomized SVD.

    The algorithm of Halko, Martinsson & Tropp (2011) with the defaults scikit-learn's PCA uses
    (its ``svd_solver='randomized'``): ``k + 10`` Gaussian test vectors drawn from
    ``numpy.random.RandomState(random_state).normal``, 7 power iterations when ``k`` is below a
    tenth of the smaller side (4 otherwise) normalised by LU, a final QR, and the operator
    transposed when it has fewer rows than columns. Following those steps reproduces the
    anchors' PCA on the same data; the approximation error is in the trailing components.
    """
    from scipy import linalg

    n, g = A.shape
    n_random = k + n_oversamples
    n_iter = 7 if k < 0.1 * min(n, g) else 4
    transpose = n < g
    # M = A^T when transposed; M @ Q and M^T @ Q in terms of A.
    if transpose:
        m_mul, mt_mul, cols = A.rmatmul, A.matmul, n
    else:
        m_mul, mt_mul, cols = A.matmul, A.rmatmul, g
    Q = np.random.RandomState(random_state).normal(size=(cols, n_random))
    for _ in range(n_iter):
        Q, _ = linalg.lu(m_mul(Q), permute_l=True, check_finite=False)
        Q, _ = linalg.lu(mt_mul(Q), permute_l=True, check_finite=False)
    Q, _ = linalg.qr(m_mul(Q), mode="economic", check_finite=False)
    B = mt_mul(Q).T  # Q^T M
    Uhat, s, Vt = linalg.svd(B, full_matrices=False, check_finite=False)
    if transpose:
        # M = A^T = U S V^T, so A = V S U^T: A's right singular vectors are Q @ Uhat.
        comps = Q @ Uhat[:, :k]
    else:
        comps = Vt[:k].T
    return comps, s[:k]


def _pca(
    X: Matrix, n_comps: int, random_state: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zero-centred PCA of ``X`` (cells x genes) without densifying a sparse ``X``.

    Returns ``(mean, components (genes x k), explained variance)`` with
    ``k = min(n_comps, cells, genes)``. The solver follows scikit-learn's ``svd_solver='auto'``
    rule (so that the numbers of ANCHORS.md reproduce): exact (an eigendecomposition of the genes x
    genes covariance or of the cells x cells Gram matrix) when genes <= 1000 and cells >= 10 x
    genes, when both sides are <= 500, or when ``k`` is not below 0.8 x the smaller side; otherwise
    the randomized SVD of :func:`_randomized_components` with a fixed ``random_state``.
    """
    n, g = X.shape
    k = max(1, min(n_comps, n, g))
    mean = np.asarray(X.mean(axis=0), dtype=np.float64).ravel()
    A = _Centered(X, mean)
    exact = (g <= 1000 and n >= 10 * g) or max(n, g) <= 500 or k >= 0.8 * min(n, g)
    if not exact:
        comps, s = _randomized_components(A, k, random_state=random_state)
        return mean, comps, s**2 / max(n - 1, 1)
    if g <= n:
        if sp.issparse(A.X):
            gram = np.asarray((A.X.T @ A.X).toarray())
        else:
            gram = A.X.T @ A.X
        cov = (gram - n * np.outer(mean, mean)) / max(n - 1, 1)
        vals, vecs = _top_eigvecs(cov, k)
        return mean, vecs, np.maximum(vals, 0.0)
    # Fewer cells than genes: eigenvectors of the centred Gram matrix give the scores.
    xm = np.asarray(A.X @ mean).ravel()
    G = A.X @ A.X.T
    G = np.asarray(G.toarray() if sp.issparse(G) else G)
    G = G - xm[:, None] - xm[None, :] + mean @ mean
    vals, vecs = _top_eigvecs(G, k)
    keep = vals > 1e-12 * max(vals[0], 1e-300)
    comps = np.zeros((g, k))
    comps[:, keep] = A.rmatmul(vecs[:, keep]) / np.sqrt(vals[keep])[None, :]
    return mean, comps, np.maximum(vals, 0.0) / max(n - 1, 1)


def fit_preprocessor(
    ref_X: Matrix, n_top_genes: int = 2000, n_comps: int = 50, counts: bool | None = None
) -> Preprocessor:
    """Learn the log-normalisation, highly variable genes and PCA from reference expression."""
    if counts is None:
        counts = is_count_matrix(ref_X)
    X_log = log_normalize(ref_X, counts)
    genes = highly_variable_genes(X_log, n_top=n_top_genes)
    mean, comps, ev = _pca(X_log[:, genes], n_comps)
    return Preprocessor(
        counts=counts, genes=genes, mean=mean, components=comps, explained_variance=ev
    )


def _coords(adata: AnnData) -> np.ndarray:
    return np.asarray(adata.obsm["spatial"], dtype=np.float64)


def _check_pair(ref: AnnData, query: AnnData) -> None:
    if "spatial" not in ref.obsm:
        raise ValueError("reference AnnData needs coordinates in obsm['spatial']")
    if ref.n_vars != query.n_vars or not np.array_equal(
        np.asarray(ref.var_names), np.asarray(query.var_names)
    ):
        raise ValueError("reference and query must have the same genes in the same order")


# --------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------


def knn_regression(ref: AnnData, query: AnnData, seed: int = 0, k: int = 10) -> np.ndarray:
    """Predict query coordinates as the mean of the ``k`` nearest reference cells in PCA space.

    ``seed`` is accepted for a uniform signature; the method is deterministic.
    """
    del seed
    _check_pair(ref, query)
    pre = fit_preprocessor(ref.X)
    Zr = pre.transform(ref.X)
    Zq = pre.transform(query.X)
    kk = min(k, Zr.shape[0])
    _, idx = cKDTree(Zr).query(Zq, k=kk)
    idx = np.asarray(idx).reshape(Zq.shape[0], kk)
    return _coords(ref)[idx].mean(axis=1)


def classical_mds(Z: np.ndarray, dim: int) -> np.ndarray:
    """Classical (Torgerson) MDS of the rows of ``Z`` under Euclidean distance.

    With Euclidean input distances, double-centring the squared distance matrix gives the Gram
    matrix of the centred rows, so the embedding equals the top ``dim`` principal-component scores
    of ``Z``; this is computed from the small feature covariance instead of an n x n matrix.
    """
    Zc = np.asarray(Z, dtype=np.float64) - np.asarray(Z, dtype=np.float64).mean(axis=0)
    vals, vecs = _top_eigvecs(Zc.T @ Zc, min(dim, Zc.shape[1]))
    out = Zc @ vecs
    if out.shape[1] < dim:  # fewer features than requested dimensions
        out = np.hstack([out, np.zeros((out.shape[0], dim - out.shape[1]))])
    return out


def pca_mds(ref: AnnData, query: AnnData, seed: int = 0) -> np.ndarray:
    """Classical MDS of the query cells' reference-fitted PCA scores to the spatial dimension.

    The output frame is arbitrary (rotation, reflection and scale are not learned): score it only
    with rotation-invariant scores. ``seed`` is accepted for a uniform signature.
    """
    del seed
    _check_pair(ref, query)
    pre = fit_preprocessor(ref.X)
    return classical_mds(pre.transform(query.X), _coords(ref).shape[1])


# --------------------------------------------------------------------------------------------
# Published tools (optional extra; imported lazily)
# --------------------------------------------------------------------------------------------


def _require(module: str, pip_name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise NotInstalledError(f"{pip_name} is not installed ({exc})") from exc


def _dense(X: Matrix) -> np.ndarray:
    return np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float32)


def _log_inputs(
    ref: AnnData, query: AnnData, n_top: int, normalise_total: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Dense log-transformed reference and query restricted to the reference's top genes.

    Genes are chosen as in :func:`knn_regression`. With ``normalise_total=False`` the returned
    values are ``log1p(X)`` without the library-size scaling.
    """
    counts = is_count_matrix(ref.X)
    Xr = log_normalize(ref.X, counts)
    genes = highly_variable_genes(Xr, n_top=n_top)
    if normalise_total:
        Xq = log_normalize(query.X, counts)
    else:
        Xr, Xq = log_normalize(ref.X, False), log_normalize(query.X, False)
    return _dense(Xr[:, genes]), _dense(Xq[:, genes])


def celery(
    ref: AnnData, query: AnnData, seed: int = 0, epochs: int = 500, batch_size: int = 32
) -> np.ndarray:
    """CeLEry (Zhang et al. 2023): a coordinate-regression network trained on the reference.

    Input: the log-normalised top-2000 variable reference genes (as :func:`knn_regression`),
    dense (CeLEry calls ``X.A`` on sparse input, which recent scipy no longer has). CeLEry reads
    the two coordinates from the first two columns of the location table and regresses them
    rescaled to ``(c - (min - 1)) / (max - min + 2)`` per axis; the prediction is mapped back
    to the reference's frame. Hidden layers [30, 25, 15], ``epochs`` epochs (with CeLEry's own
    early stopping), batch ``batch_size``, learning rate 1e-4. 2-D only.
    """
    cel = _require("CeLEry", "celerypy")
    import tempfile

    import anndata as ad

    coords = _coords(ref)
    if coords.shape[1] != 2:
        raise ValueError("CeLEry predicts 2-D coordinates only")
    _check_pair(ref, query)
    Xr, Xq = _log_inputs(ref, query, 2000)
    loc = pd.DataFrame({"x_cord": coords[:, 0], "y_cord": coords[:, 1]})
    a_ref = ad.AnnData(Xr, obs=loc.set_index(pd.Index([f"r{i}" for i in range(len(loc))])))
    a_q = ad.AnnData(Xq)
    with tempfile.TemporaryDirectory() as tmp:
        cel.Fit_cord(
            data_train=a_ref,
            location_data=loc,
            hidden_dims=[30, 25, 15],
            num_epochs_max=epochs,
            path=tmp,
            filename="celery_model",
            batch_size=batch_size,
            num_workers=0,
            seednum=seed,
        )
        pred = np.asarray(cel.Predict_cord(data_test=a_q, path=tmp, filename="celery_model"))
    pred = pred.reshape(a_q.n_obs, 2).astype(np.float64)
    lo = coords.astype(np.float32).min(axis=0).astype(np.float64) - 1.0
    hi = coords.astype(np.float32).max(axis=0).astype(np.float64) + 1.0
    return lo + pred * (hi - lo)


def tangram(
    ref: AnnData, query: AnnData, seed: int = 0, n_genes: int = 500, epochs: int = 500
) -> np.ndarray:
    """Tangram (Biancalani et al. 2021), cells mode: map query cells onto reference "spots".

    The reference (with coordinates) plays the spatial data, the query the single cells, both
    log-normalised on the reference's top ``n_genes`` variable genes; ``epochs`` epochs, a uniform
    density prior (each reference "spot" is one cell; Tangram's default RNA-count prior scored
    0.37 instead of 0.57 on breast layer 1, seed 0), other settings Tangram's defaults. Each query
    cell's coordinates are the probability-weighted mean of the reference coordinates under the
    learned cells x spots mapping.
    """
    tg = _require("tangram", "tangram-sc")
    import anndata as ad

    _check_pair(ref, query)
    Xr, Xq = _log_inputs(ref, query, n_genes)
    names = [f"g{i}" for i in range(Xr.shape[1])]
    a_sp = ad.AnnData(Xr, var=pd.DataFrame(index=names))
    a_sc = ad.AnnData(Xq, var=pd.DataFrame(index=names))
    tg.pp_adatas(a_sc, a_sp, genes=names)
    amap = tg.map_cells_to_space(
        a_sc,
        a_sp,
        mode="cells",
        num_epochs=epochs,
        random_state=seed,
        device="cpu",
        verbose=False,
        density_prior="uniform",
    )
    M = np.asarray(amap.X, dtype=np.float64)  # (n_query, n_ref)
    M = M / np.maximum(M.sum(axis=1, keepdims=True), 1e-300)
    return M @ _coords(ref)


def novosparc(ref: AnnData, query: AnnData, seed: int = 0, alpha: float = 0.5) -> np.ndarray:
    """novoSpaRc (Nitzan et al. 2019) with the reference as atlas.

    Locations are the reference cells, the atlas their ``log1p`` expression (no library-size
    scaling: with it novoSpaRc's transport often failed to converge) of the top 2000 variable
    reference genes; the query cells are mapped by novoSpaRc's fused Gromov-Wasserstein
    transport (``alpha`` weights the atlas term; 5 expression and 5 physical neighbours; its own
    epsilon search). Each query cell's coordinates are the transport-weighted mean of the
    reference coordinates. Dense: memory grows with n_query x n_ref plus both squared distance
    matrices.
    """
    nv = _require("novosparc", "novosparc")
    import anndata as ad

    _check_pair(ref, query)
    np.random.seed(seed)  # noqa: NPY002 - the tool draws from the global state
    Xr, Xq = _log_inputs(ref, query, 2000, normalise_total=False)
    coords = _coords(ref)
    a_q = ad.AnnData(Xq)
    markers = np.arange(Xr.shape[1])
    tissue = nv.cm.Tissue(dataset=a_q, locations=coords, atlas_matrix=Xr, markers_to_use=markers)
    tissue.setup_reconstruction(atlas_matrix=Xr, markers_to_use=markers, verbose=False)
    tissue.reconstruct(alpha_linear=alpha, verbose=False)
    G = np.asarray(tissue.gw, dtype=np.float64)  # (n_query, n_locations)
    if not np.isfinite(G).all():
        raise RuntimeError("novoSpaRc's transport did not converge (non-finite coupling)")
    G = G / np.maximum(G.sum(axis=1, keepdims=True), 1e-300)
    return G @ coords


COMPARATORS: dict[str, Callable[..., np.ndarray]] = {
    "knn_regression": knn_regression,
    "pca_mds": pca_mds,
    "celery": celery,
    "tangram": tangram,
    "novosparc": novosparc,
}
