"""Figures a biologist can read (matplotlib; the backend is the caller's choice).

Point clouds follow squidpy's ``spatial_scatter`` conventions: equal aspect, no ticks, a scale bar,
a colour bar naming the quantity for numbers and a legend naming the categories for classes.

- :func:`plot_prediction`: the true layout beside the predicted one (``mode=reconstruct`` is
  rotated, reflected and scaled onto the truth for display, as its Procrustes score does);
- :func:`plot_training`: a run's loss parts, validation scores, lambda and distortion per epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from dpvae.errors import DataError
from dpvae.metrics import format_scores


def _colouring(adata: ad.AnnData, color: str | None) -> tuple[Any, str, list[str] | None]:
    """(values, what they are, category names or None)."""
    if color is None:
        return None, "", None
    if color in adata.obs:
        col = adata.obs[color]
        if pd.api.types.is_numeric_dtype(col.dtype) and not isinstance(
            col.dtype, pd.CategoricalDtype
        ):
            label = color
            if color == "dpvae_radius90":
                label = "90% radius (true position within it with 90% probability)"
            return col.to_numpy(dtype=float), label, None
        cat = col.astype(str).astype("category")
        return cat.cat.codes.to_numpy(), color, [str(c) for c in cat.cat.categories]
    if color in adata.var_names:
        x = adata[:, color].X
        raw = np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=float).ravel()
        return np.log1p(np.maximum(raw, 0.0)), f"log1p({color} expression)", None
    raise DataError(f"plot={color}: neither an obs column nor a gene of the query")


def align_for_display(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """``pred`` moved onto ``truth`` by the best rotation/reflection, translation and scale."""
    ok = np.isfinite(pred).all(axis=1) & np.isfinite(truth).all(axis=1)
    p, t = pred[ok], truth[ok]
    pm, tm = p.mean(0), t.mean(0)
    u, s, vt = np.linalg.svd((p - pm).T @ (t - tm))
    rot = u @ vt
    scale = s.sum() / max(((p - pm) ** 2).sum(), 1e-12)
    return (pred - pm) @ rot * scale + tm


def _bar_length(xy: np.ndarray) -> float:
    """A round length about a fifth of the layout's width (1, 2 or 5 times a power of ten)."""
    finite = xy[np.isfinite(xy).all(axis=1)]
    width = float(np.ptp(finite[:, 0])) if len(finite) else 1.0
    target = (width or 1.0) / 5
    nice = 10 ** np.floor(np.log10(target))
    return float(max(m * nice for m in (1, 2, 5) if m * nice <= target))


def _scale_bar(ax: Any, length: float) -> None:
    """A bar of ``length`` coordinate units in the lower left corner of the axes."""
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    ax.add_artist(
        AnchoredSizeBar(
            ax.transData,
            length,
            f"{length:g} (coordinate units)",
            "lower left",
            pad=0.3,
            frameon=False,
            size_vertical=0,
            fontproperties={"size": 8},
        )
    )


def plot_prediction(
    adata: ad.AnnData, color: str | None, path: str | Path, spatial_key: str = "spatial"
) -> Path:
    """PNG of :func:`prediction_figure`."""
    import matplotlib.pyplot as plt

    from dpvae.io import write_atomic

    fig = prediction_figure(adata, color, spatial_key)
    try:
        return write_atomic(
            path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
        )
    finally:
        plt.close(fig)


def prediction_figure(adata: ad.AnnData, color: str | None, spatial_key: str = "spatial") -> Any:
    """The predicted layout (and the true one beside it, with the scores, when known), coloured
    by a gene (log1p expression, with a colour bar) or an obs column (a legend of its classes)."""
    import matplotlib.pyplot as plt

    values, label, categories = _colouring(adata, color)
    info = adata.uns.get("dpvae", {})
    pred = np.asarray(adata.obsm["spatial_dpvae"], dtype=float)
    panels = [("predicted by dpvae", pred)]
    if spatial_key in adata.obsm:
        truth = np.asarray(adata.obsm[spatial_key], dtype=float)
        if info.get("mode") == "reconstruct":
            panels[0] = (
                "reconstructed (aligned onto the truth for display)",
                align_for_display(pred, truth),
            )
        panels.insert(0, ("true layout", truth))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.8 * len(panels), 5.4), squeeze=False)
    cmap: Any = "viridis"
    if categories:  # a qualitative palette of up to 60 distinct colours
        from matplotlib.colors import ListedColormap

        colours = np.vstack([plt.get_cmap(n)(np.arange(20)) for n in ("tab20", "tab20b", "tab20c")])
        cmap = (
            ListedColormap(colours[: max(len(categories), 1)]) if len(categories) <= 60 else "turbo"
        )
    handle = None
    bar = _bar_length(panels[0][1])  # one length for both panels: one frame, one scale
    for ax, (name, xy) in zip(axes[0], panels, strict=True):
        kwargs: dict[str, Any] = {"s": 5, "linewidths": 0}
        if values is not None:
            kwargs.update(c=values, cmap=cmap)
            if categories:
                kwargs.update(vmin=-0.5, vmax=len(categories) - 0.5)
        handle = ax.scatter(xy[:, 0], xy[:, 1], **kwargs)
        ax.set_title(name)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ("top", "right", "bottom", "left"):
            ax.spines[side].set_visible(False)
        _scale_bar(ax, bar)
    if len(panels) == 2:
        axes[0][1].set_xlim(axes[0][0].get_xlim())  # the same frame: the same axes
        axes[0][1].set_ylim(axes[0][0].get_ylim())
    if values is not None and handle is not None:
        if categories:
            colours = handle.cmap(handle.norm(np.arange(len(categories))))
            markers = [
                plt.Line2D([], [], marker="o", ls="", color=c, label=n)
                for c, n in zip(colours, categories, strict=True)
            ]
            fig.legend(
                handles=markers,
                title=label,
                loc="center left",
                bbox_to_anchor=(1.0, 0.5),
                fontsize=7,
                ncol=1 if len(categories) <= 18 else 2,
                frameon=False,
            )
        else:
            fig.colorbar(handle, ax=list(axes[0]), label=label, shrink=0.7)
    if info.get("scores"):
        flag = ""
        if info.get("n_cells_in_sample"):
            flag = f"IN-SAMPLE ({info['n_cells_in_sample']} query cells are reference cells):  "
        fig.suptitle(flag + format_scores(info["scores"], sep="   "), fontsize=10)
    return fig


def plot_training(history: Sequence[dict[str, float]], path: str | Path, warmup: int = 0) -> Path:
    """PNG of a run's curves: loss parts, validation scores, lambda and distortion per epoch."""
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[np.ndarray, np.ndarray]:
        rows = [r for r in history if key in r]
        return np.array([r["epoch"] + 1 for r in rows]), np.array([r[key] for r in rows])

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    panels = [
        (
            axes[0][0],
            "loss and its parts",
            ["train/loss", "val/loss", "train/recon", "train/kl", "train/reg"],
            "per gene",
        ),
        (
            axes[0][1],
            "held-out cells: distance scores",
            ["val/dist_pearson", "val/knn10"],
            "score (1 is perfect)",
        ),
        (axes[1][0], "held-out cells: placement error", ["val/median_error"], "cell spacings"),
        (axes[1][1], "lambda and latent distortion", ["train/lambda", "val/distortion_p95_p5"], ""),
    ]
    for ax, title, keys, ylabel in panels:
        for key in keys:
            x, y = series(key)
            if len(x):
                ax.plot(x, y, marker="o" if len(x) < 30 else None, ms=3, label=key)
        if warmup:
            ax.axvline(warmup + 0.5, color="grey", ls=":", lw=1)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        if any(not line.get_label().startswith("_") for line in ax.lines):  # not the warm-up's
            ax.legend(fontsize=7, frameon=False)
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    if warmup:
        fig.text(
            0.5,
            0.005,
            f"dotted line: the distance regularizer switches on after epoch {warmup}",
            ha="center",
            fontsize=8,
            color="grey",
        )
    fig.tight_layout()
    from dpvae.io import write_atomic

    try:
        return write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
