"""Predict coordinates of new cells or sections with a trained dp-VAE.

Command line::

    python -m dpvae.predict checkpoint=RUN_DIR/model.ckpt query=Q.h5ad output=OUT.h5ad \\
        [mode=impute|reconstruct] [reference=REF.h5ad] [k=8] [n_iter=0] [expression_weight=1.25] \\
        [align_query=false] [plot=GENE_OR_OBS_COLUMN] \\
        [spatial_key=spatial] [layer=NAME] [overwrite=false]

``mode=impute`` (default) places each query cell in the reference's frame against its latent
neighbours among the reference cells (by default the ``embedding.h5ad`` written next to the
checkpoint; ``reference=`` may name that file or any reference ``.h5ad`` with expression and
coordinates, which the model then embeds). ``mode=reconstruct`` solves the whole query's layout up to
rigid motion from its latent distances alone.

The output is the query plus ``obsm['spatial_dpvae']`` (coordinates), ``obsm['X_dpvae']`` (latent)
and ``uns['dpvae']`` (checkpoint, mode, genes used, lambda, and scores when the query carries true
coordinates). It is written through a temporary file and a rename; the query file is never modified.
From Python::

    from dpvae.predict import load_model, predict_coordinates
    model = load_model("runs/x/model.ckpt")
    out = predict_coordinates(model, adata)          # an AnnData with obsm['spatial_dpvae']
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import torch

from dpvae.errors import DataError, DPVAEError
from dpvae.io import align_genes, get_coordinates, read_h5ad, write_h5ad_atomic
from dpvae.module import DPVAE
from dpvae.solver import EXPRESSION_WEIGHT, NEIGHBOURS, calibrate_in_sample

MODES = ("impute", "reconstruct")
EMBEDDING_FILE = "embedding.h5ad"
EXPR_PCS = "X_expr_pcs"  # obsm key of the reference's expression PCs in embedding.h5ad


def load_model(checkpoint: str | Path, map_location: str = "cpu") -> DPVAE:
    """Load a trained model; remembers the checkpoint path to find its reference embedding."""
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such checkpoint; give RUN_DIR/model.ckpt of a training run")
    try:
        model = DPVAE.load_from_checkpoint(path, map_location=map_location)
    except Exception as exc:
        raise DataError(f"{path}: not a dpvae checkpoint ({type(exc).__name__}: {exc})") from exc
    model.eval()
    model.checkpoint_path = str(path.resolve())  # type: ignore[assignment]
    return model


def encode_query(
    model: DPVAE, query: ad.AnnData, layer: str | None = None
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Latent codes and expression PCs of the query cells, genes matched to the model's by name.

    Missing genes are zero-filled with a warning that says how many. Returns
    (latent, expression PCs or ``None``, n_missing).
    """
    raw, missing = align_genes(query, model.genes, layer=layer)
    if missing:
        warnings.warn(
            f"{missing} of the model's {len(model.genes)} genes are missing from the query; "
            "they are filled with zeros",
            stacklevel=2,
        )
    latent, pcs = model.embed(raw, with_pcs=True)
    return latent, pcs, missing


def embed_query(
    model: DPVAE, query: ad.AnnData, layer: str | None = None
) -> tuple[np.ndarray, int]:
    """Latent codes of the query cells (see :func:`encode_query`); returns (latent, n_missing)."""
    latent, _, missing = encode_query(model, query, layer)
    return latent, missing


def _is_embedding(adata: ad.AnnData, model: DPVAE) -> bool:
    names = [str(v) for v in adata.var_names]
    return len(names) == model.hparams["latent_dim"] and all(v.startswith("latent_") for v in names)


def reference_embedding(
    model: DPVAE, reference: str | Path | ad.AnnData | None = None, spatial_key: str = "spatial"
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Latent codes, coordinates and expression PCs (or ``None``) of the reference cells.

    ``reference``: ``None`` for the ``embedding.h5ad`` next to the model's checkpoint, the path of
    such an embedding file, or a reference ``.h5ad``/AnnData with expression and coordinates. In an
    embedding file the training cells (``obs['split'] == 'train'``) are calibrated against the
    held-out ones (:func:`dpvae.solver.calibrate_in_sample`); cells of an expression reference are
    embedded as new cells, as they are.
    """
    if reference is None:
        ckpt = getattr(model, "checkpoint_path", None)
        if ckpt is None:
            raise DataError("no reference given; pass reference=REF.h5ad (cells with coordinates)")
        reference = Path(ckpt).parent / EMBEDDING_FILE
        if not reference.exists():
            raise DataError(
                f"{reference} not found next to the checkpoint; pass reference=REF.h5ad"
            )
    adata = reference if isinstance(reference, ad.AnnData) else read_h5ad(reference)
    coords = get_coordinates(adata, spatial_key)
    if _is_embedding(adata, model):
        latent = np.asarray(adata.X, dtype=np.float32)
        pcs = np.asarray(adata.obsm[EXPR_PCS]) if EXPR_PCS in adata.obsm else None
        if "split" in adata.obs:  # the run's own cells: calibrate the training ones
            in_sample = np.asarray(adata.obs["split"].astype(str) == "train")
            latent = calibrate_in_sample(latent, in_sample)[0]
    else:
        latent, pcs, _ = encode_query(model, adata)
    return latent, coords, pcs


def impute_coordinates(
    model: DPVAE,
    query: ad.AnnData,
    ref_latent: np.ndarray,
    ref_coords: np.ndarray,
    k: int = NEIGHBOURS,
    layer: str | None = None,
    n_iter: int = 0,
    ref_pcs: np.ndarray | None = None,
    expression_weight: float = EXPRESSION_WEIGHT,
    align_query: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Query coordinates in the reference frame (original units) and the query's latent codes.

    ``align_query``: the query is another batch (a new section, dissociated cells): shift its
    latent codes and expression PCs so that their mean is the reference's before the neighbour
    search, removing the batch's overall expression shift (DLPFC 151673 -> 151674 transfer:
    dist_pearson 0.61 -> 0.68). Leave it off when the query is a sample of the reference's own
    tissue whose composition may differ from the reference's (a sub-region), where the means
    differ for biological reasons.

    When the model has expression principal components (``data.neighbour_pcs``, on by default) and
    ``ref_pcs`` are given (and ``n_iter`` is 0), neighbours are searched in the latent space joined
    with those components (each part scaled to unit spread on the reference, the PCs times
    ``expression_weight``): the latent code carries the distance-preserving geometry, the leading
    expression components sharpen who is next to whom. With the calibration of the reference's
    training cells (:func:`reference_embedding`), over three seeds this took DLPFC 151674 from
    dist_pearson 0.708 / knn10 0.098 to 0.759 / 0.138 and STARmap from 0.472 to 0.522 (see
    BENCHMARKS.md).

    Each query cell starts at the distance-weighted mean of its ``k`` latent neighbours' coordinates;
    ``n_iter`` > 0 then minimises the weighted stress to those neighbours
    (:func:`dpvae.solver.impute`). The default is the neighbour mean alone: on the dev datasets the
    stress refinement lowered dist_pearson on every one (e.g. osmFISH 0.573 -> 0.554, MERFISH
    0.396 -> 0.348, breast layer 1 0.619 -> 0.594), because latent distances between truly adjacent
    cells do not shrink to zero (expression noise), which the refinement reads as distance.
    """
    from dpvae.solver import impute, joint_space, knn_mean

    latent, pcs, _ = encode_query(model, query, layer)
    pre = model.preprocessor
    ref_std = torch.as_tensor(pre.coords_to_model(ref_coords), dtype=torch.float64)
    k = min(k, len(ref_latent))
    zq = torch.as_tensor(latent, dtype=torch.float64)
    zr = torch.as_tensor(ref_latent, dtype=torch.float64)
    if align_query:
        zq = zq - zq.mean(dim=0) + zr.mean(dim=0)
        if pcs is not None and ref_pcs is not None:
            pcs = pcs - pcs.mean(axis=0) + ref_pcs.mean(axis=0)
    if n_iter == 0 and pcs is not None and ref_pcs is not None and expression_weight > 0:
        jr, jq = joint_space(
            zr,
            zq,
            torch.as_tensor(ref_pcs, dtype=torch.float64),
            torch.as_tensor(pcs, dtype=torch.float64),
            expression_weight,
        )
        std = knn_mean(jq, jr, ref_std, k=k)
    else:
        std = impute(zq, zr, ref_std, scale=model.scale_value(), k=k, n_iter=n_iter)
    return pre.coords_from_model(std.numpy()), latent


def reconstruct_coordinates(
    model: DPVAE, query: ad.AnnData, layer: str | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The query's own layout, up to rigid motion, in the reference's units; and its latent codes."""
    from dpvae.solver import reconstruct

    latent, _ = embed_query(model, query, layer)
    if len(latent) < 3:
        raise DataError("reconstruct needs at least 3 query cells; use mode=impute")
    pre = model.preprocessor
    std = reconstruct(
        torch.as_tensor(latent, dtype=torch.float64),
        pre.spatial_dim,
        model.scale_value(),
        seed=seed,
    )
    return std.numpy() * pre.coord_scale, latent


def predict_coordinates(
    model: DPVAE,
    query: ad.AnnData,
    mode: str = "impute",
    reference: str | Path | ad.AnnData | None = None,
    k: int = NEIGHBOURS,
    spatial_key: str = "spatial",
    layer: str | None = None,
    n_iter: int = 0,
    expression_weight: float = EXPRESSION_WEIGHT,
    align_query: bool = False,
) -> ad.AnnData:
    """A copy of ``query`` with ``obsm['spatial_dpvae']``, ``obsm['X_dpvae']`` and ``uns['dpvae']``.

    When the query has true coordinates under ``obsm[spatial_key]``, the scores of the benchmark
    protocol are added to ``uns['dpvae']['scores']`` (impute scores for ``mode=impute``; the
    rotation-invariant transfer scores for ``mode=reconstruct``).
    """
    from dpvae.metrics import score_coordinates

    if mode not in MODES:
        raise DataError(f"unknown mode '{mode}'; choose one of: {', '.join(MODES)}")
    if query.n_obs == 0:
        raise DataError("the query has no cells; give a file with at least one cell")
    if mode == "impute":
        ref_latent, ref_coords, ref_pcs = reference_embedding(model, reference, spatial_key)
        coords, latent = impute_coordinates(
            model,
            query,
            ref_latent,
            ref_coords,
            k,
            layer,
            n_iter,
            ref_pcs,
            expression_weight,
            align_query,
        )
    else:
        coords, latent = reconstruct_coordinates(model, query, layer)
    out = query.to_memory() if query.isbacked else query.copy()
    out.obsm["spatial_dpvae"] = coords
    out.obsm["X_dpvae"] = latent
    shared = set(map(str, query.var_names))
    info: dict[str, Any] = {
        "checkpoint": str(getattr(model, "checkpoint_path", "")),
        "mode": mode,
        "genes": model.genes,
        "n_genes_missing": int(sum(g not in shared for g in model.genes)),
        "lambda": model.scale_value(),
    }
    if spatial_key in query.obsm and len(coords) >= 3:
        truth = get_coordinates(query, spatial_key)
        finite = np.all(np.isfinite(truth), axis=1)
        if finite.sum() >= 3:
            task = "impute" if mode == "impute" else "transfer"
            nn = model.preprocessor.ref_nn_distance if task == "impute" else None
            info["scores"] = score_coordinates(coords[finite], truth[finite], task, nn)
    out.uns["dpvae"] = info
    return out


def plot_prediction(
    adata: ad.AnnData, color: str | None, path: str | Path, spatial_key: str = "spatial"
) -> Path:
    """PNG of the predicted layout (and the true one beside it, with scores, when known)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values: Any = None
    title = "predicted"
    if color is not None:
        if color in adata.obs:
            col = adata.obs[color]
            numeric = pd.api.types.is_numeric_dtype(col.dtype)
            values = col.to_numpy() if numeric else col.astype("category").cat.codes.to_numpy()
        elif color in adata.var_names:
            x = adata[:, color].X
            values = np.log1p(np.asarray(x.toarray() if hasattr(x, "toarray") else x).ravel())
        else:
            raise DataError(f"plot={color}: neither an obs column nor a gene of the query")
        title = f"predicted, coloured by {color}"
    panels = [("spatial_dpvae", title)]
    if spatial_key in adata.obsm:
        panels.insert(0, (spatial_key, "true"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 5), squeeze=False)
    for ax, (key, name) in zip(axes[0], panels):
        xy = np.asarray(adata.obsm[key])
        ax.scatter(
            xy[:, 0], xy[:, 1], c=values, s=4, cmap="viridis" if values is not None else None
        )
        ax.set_title(name)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    if len(panels) == 2 and adata.uns.get("dpvae", {}).get("mode") == "impute":
        axes[0][1].set_xlim(axes[0][0].get_xlim())  # the same frame: the same axes
        axes[0][1].set_ylim(axes[0][0].get_ylim())
    scores = adata.uns.get("dpvae", {}).get("scores")
    if scores:
        fig.suptitle("  ".join(f"{k}={v:.3f}" for k, v in scores.items()))
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


_KEYS = {
    "checkpoint",
    "query",
    "output",
    "mode",
    "reference",
    "k",
    "n_iter",
    "plot",
    "spatial_key",
    "layer",
    "overwrite",
    "expression_weight",
    "align_query",
}


def _parse(argv: list[str]) -> dict[str, str]:
    args: dict[str, str] = {}
    for item in argv:
        if "=" not in item:
            raise DPVAEError(f"expected key=value, got '{item}'; keys: {', '.join(sorted(_KEYS))}")
        key, value = item.split("=", 1)
        if key not in _KEYS:
            raise DPVAEError(f"unknown key '{key}'; valid keys: {', '.join(sorted(_KEYS))}")
        args[key] = value
    for required in ("checkpoint", "query", "output"):
        if required not in args:
            raise DPVAEError(
                f"missing {required}=...; usage: python -m dpvae.predict checkpoint=RUN/model.ckpt "
                "query=Q.h5ad output=OUT.h5ad [mode=impute|reconstruct]"
            )
    return args


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; a user error prints one line and exits with status 2."""
    try:
        args = _parse(list(sys.argv[1:] if argv is None else argv))
        query_path = Path(args["query"]).expanduser()
        output = Path(args["output"]).expanduser()
        if output.resolve() == query_path.resolve():
            raise DPVAEError("output must differ from query; the query file is never modified")
        if output.exists() and args.get("overwrite", "false").lower() != "true":
            raise DPVAEError(f"{output} exists; choose another output or add overwrite=true")
        try:
            k, n_iter = int(args.get("k", str(NEIGHBOURS))), int(args.get("n_iter", "0"))
            weight = float(args.get("expression_weight", str(EXPRESSION_WEIGHT)))
        except ValueError as exc:
            raise DPVAEError(
                "k and n_iter must be integers and expression_weight a number; got "
                + ", ".join(
                    f"{key}={args.get(key)}" for key in ("k", "n_iter", "expression_weight")
                )
            ) from exc
        align = args.get("align_query", "false").lower()
        if align not in ("true", "false"):
            raise DPVAEError(f"align_query must be true or false, got '{args['align_query']}'")
        model = load_model(args["checkpoint"])
        query = read_h5ad(query_path, backed=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = predict_coordinates(
                model,
                query,
                mode=args.get("mode", "impute"),
                reference=args.get("reference"),
                k=k,
                spatial_key=args.get("spatial_key", "spatial"),
                layer=args.get("layer"),
                n_iter=n_iter,
                expression_weight=weight,
                align_query=align == "true",
            )
        for w in caught:
            if "genes are missing" in str(w.message):
                print(f"dpvae: warning: {w.message}", file=sys.stderr)
        write_h5ad_atomic(out, output)
        print(f"dpvae: wrote {output} ({out.n_obs} cells, mode={out.uns['dpvae']['mode']})")
        if "scores" in out.uns["dpvae"]:
            scores = out.uns["dpvae"]["scores"]
            print("dpvae: scores " + " ".join(f"{k}={v:.3f}" for k, v in scores.items()))
        if "plot" in args:
            png = plot_prediction(
                out,
                args["plot"] or None,
                output.with_suffix(".png"),
                args.get("spatial_key", "spatial"),
            )
            print(f"dpvae: wrote {png}")
    except DPVAEError as exc:
        print(f"dpvae: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
