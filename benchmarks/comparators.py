"""Comparator methods of the spatial-reconstruction benchmark (see ``../shared/BENCHMARK.md``).

Every comparator has the same signature as the dp-VAE entry point::

    method(ref: AnnData, query: AnnData, seed: int) -> np.ndarray  # (n_query, spatial_dim)

``ref`` carries expression in ``X`` and coordinates in ``obsm['spatial']``; ``query`` carries
expression only, with the same genes in the same order. Everything (normalisation, gene selection,
PCA) is learned from the reference cells alone.

The two baselines use the reference implementations, as the published protocol does:

* :func:`knn_regression` -- scanpy's ``normalize_total(target_sum=1e4)`` and ``log1p`` (``log1p``
  alone when ``X`` is not count data), the 2000 genes of largest log-normalised variance (see
  :func:`highly_variable_genes` for why not one of scanpy's flavours), scikit-learn's ``PCA`` to 50
  fitted on the reference, and the mean coordinates of the 10 nearest reference cells in PCA space
  (scikit-learn's ``NearestNeighbors``).
* :func:`pca_mds` -- the same PCA, then the project's classical MDS
  (:func:`dpvae.solver.classical_mds`) of the query cells to the spatial dimension.

The published tools CeLEry, Tangram and novoSpaRc are wrapped by :func:`celery`, :func:`tangram`
and :func:`novosparc`. They are an optional extra: each imports its package lazily and raises
:class:`NotInstalledError` when the package is absent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors

__all__ = [
    "COMPARATORS",
    "NotInstalledError",
    "Preprocessor",
    "celery",
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
    """scanpy's ``log1p(normalize_total(X, target_sum))`` for count data, ``log1p(X)`` otherwise.

    Works on a float64 copy (``X`` is not modified); sparse input stays sparse (CSR). scanpy leaves
    a cell with zero total at zero.
    """
    if sp.issparse(X):
        X = sp.csr_matrix(X, dtype=np.float64, copy=True)
    else:
        X = np.array(X, dtype=np.float64, copy=True)
    adata = ad.AnnData(X)
    if counts:
        sc.pp.normalize_total(adata, target_sum=target_sum)
    sc.pp.log1p(adata)
    return adata.X


def highly_variable_genes(X_log: Matrix, n_top: int = 2000) -> np.ndarray:
    """Indices (ascending) of the ``n_top`` genes of largest variance of log-normalised values.

    This ranking is what reproduces ANCHORS.md; none of ``scanpy.pp.highly_variable_genes``'s
    flavours does. kNN regression's dist_pearson, mean over seeds 0-2, on DLPFC 151673 and breast
    layer 1 (anchors 0.646 and 0.297): this ranking 0.646 and 0.297; ``seurat`` 0.597 and 0.245;
    ``cell_ranger`` 0.589 and 0.140; ``seurat_v3`` (on the counts) 0.621 and 0.523;
    ``pearson_residuals`` 0.614 and 0.213.

    Ties are broken by gene order. When there are no more than ``n_top`` genes, all are returned.
    """
    n_genes = X_log.shape[1]
    if n_genes <= n_top:
        return np.arange(n_genes)
    squares = X_log.multiply(X_log) if sp.issparse(X_log) else np.square(X_log)
    mean = np.asarray(X_log.mean(axis=0)).ravel()
    var = np.asarray(squares.mean(axis=0)).ravel() - mean**2
    return np.sort(np.argsort(-var, kind="stable")[:n_top])


def _dense(X: Matrix, dtype: Any = np.float64) -> np.ndarray:
    return np.asarray(X.toarray() if sp.issparse(X) else X, dtype=dtype)


@dataclass
class Preprocessor:
    """What the baselines learn from the reference: the transform, genes and PCA."""

    counts: bool
    genes: np.ndarray
    pca: PCA

    def transform(self, X: Matrix) -> np.ndarray:
        """Log-normalise ``X`` (full gene set, reference order), select genes, project on PCs."""
        return self.pca.transform(_dense(log_normalize(X, self.counts)[:, self.genes]))


def fit_preprocessor(
    ref_X: Matrix, n_top_genes: int = 2000, n_comps: int = 50, counts: bool | None = None
) -> Preprocessor:
    """Learn the log-normalisation, highly variable genes and PCA from reference expression.

    The PCA is scikit-learn's on the dense selected genes, with the solver that reproduces
    ANCHORS.md (scikit-learn >= 1.5's ``svd_solver="auto"`` rule, spelled out so that older
    versions agree): exact (``"full"``) for a targeted panel (at most 1000 genes and ten times as
    many cells), a small matrix (both sides at most 500) or ``n_comps`` of at least 0.8 times the
    smaller side; ``"randomized"`` with ``random_state=0`` otherwise (the transcriptome-wide
    sections). Another choice moves the anchors: exact PCA on breast layer 1 turns kNN regression's
    seed-0 dist_pearson from 0.296 into 0.258, randomized PCA on the 161-gene MERFISH panel moves
    it by up to 0.003.
    """
    if counts is None:
        counts = is_count_matrix(ref_X)
    X_log = log_normalize(ref_X, counts)
    genes = highly_variable_genes(X_log, n_top=n_top_genes)
    X = _dense(X_log[:, genes])
    (n, g), k = X.shape, max(1, min(n_comps, *X.shape))
    exact = (g <= 1000 and n >= 10 * g) or max(n, g) <= 500 or k >= 0.8 * min(n, g)
    pca = PCA(n_components=k, svd_solver="full" if exact else "randomized", random_state=0)
    pca.fit(X)
    return Preprocessor(counts=counts, genes=genes, pca=pca)


def _coords(adata: ad.AnnData) -> np.ndarray:
    return np.asarray(adata.obsm["spatial"], dtype=np.float64)


def _check_pair(ref: ad.AnnData, query: ad.AnnData) -> None:
    if "spatial" not in ref.obsm:
        raise ValueError("reference AnnData needs coordinates in obsm['spatial']")
    if ref.n_vars != query.n_vars or not np.array_equal(
        np.asarray(ref.var_names), np.asarray(query.var_names)
    ):
        raise ValueError("reference and query must have the same genes in the same order")


# --------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------


def knn_regression(ref: ad.AnnData, query: ad.AnnData, seed: int = 0, k: int = 10) -> np.ndarray:
    """Predict query coordinates as the mean of the ``k`` nearest reference cells in PCA space.

    ``seed`` is accepted for a uniform signature; the method is deterministic.
    """
    del seed
    _check_pair(ref, query)
    pre = fit_preprocessor(ref.X)
    Zr = pre.transform(ref.X)
    Zq = pre.transform(query.X)
    kk = min(k, Zr.shape[0])
    _, idx = NearestNeighbors(n_neighbors=kk).fit(Zr).kneighbors(Zq)
    return _coords(ref)[idx].mean(axis=1)


def pca_mds(ref: ad.AnnData, query: ad.AnnData, seed: int = 0) -> np.ndarray:
    """Classical MDS of the query cells' reference-fitted PCA scores to the spatial dimension.

    The Euclidean distances between the query cells' PCA scores go to
    :func:`dpvae.solver.classical_mds`. The output frame is arbitrary (rotation, reflection and
    scale are not learned): score it only with rotation-invariant scores. ``seed`` is accepted for
    a uniform signature. Dense: memory grows with the square of the query's size.
    """
    import torch
    from scipy.spatial.distance import pdist, squareform

    from dpvae.solver import classical_mds

    del seed
    _check_pair(ref, query)
    Z = fit_preprocessor(ref.X).transform(query.X)
    D = torch.from_numpy(squareform(pdist(Z)))
    return classical_mds(D, _coords(ref).shape[1]).numpy().astype(np.float64)


# --------------------------------------------------------------------------------------------
# Published tools (optional extra; imported lazily)
# --------------------------------------------------------------------------------------------


def _require(module: str, pip_name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise NotInstalledError(f"{pip_name} is not installed ({exc})") from exc


def _log_inputs(
    ref: ad.AnnData, query: ad.AnnData, n_top: int, normalise_total: bool = True
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
    return _dense(Xr[:, genes], np.float32), _dense(Xq[:, genes], np.float32)


def celery(
    ref: ad.AnnData, query: ad.AnnData, seed: int = 0, epochs: int = 500, batch_size: int = 32
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
    ref: ad.AnnData, query: ad.AnnData, seed: int = 0, n_genes: int = 500, epochs: int = 500
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


def novosparc(ref: ad.AnnData, query: ad.AnnData, seed: int = 0, alpha: float = 0.5) -> np.ndarray:
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
