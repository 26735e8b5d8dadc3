"""Figures of predicted layouts (matplotlib; the backend is the caller's choice)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from dpvae.errors import DataError


def plot_prediction(
    adata: ad.AnnData, color: str | None, path: str | Path, spatial_key: str = "spatial"
) -> Path:
    """PNG of the predicted layout (and the true one beside it, with scores, when known)."""
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
