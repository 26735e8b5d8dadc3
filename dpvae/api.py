"""Python entry points: build, train and apply a dp-VAE without the command line.

``build`` turns a composed config into (datamodule, model); ``train.py`` uses it too. ``fit`` trains
in memory (no files), ``fit_predict`` trains on a reference and places query cells in its frame: the
one call the benchmark makes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import torch
from omegaconf import DictConfig

from dpvae.config import instantiate, load_config, locate, to_plain
from dpvae.module import DPVAE


def build(cfg: DictConfig, reference: ad.AnnData | None = None) -> tuple[Any, DPVAE]:
    """Instantiate and set up the datamodule of ``cfg.data`` and the model of ``cfg.model``.

    The datamodule is told whether the likelihood needs raw counts, and the model gets the gene
    count and the preprocessing learned on the reference. ``reference`` replaces ``data.reference``
    with an in-memory AnnData.
    """
    likelihood_cls = locate(cfg.model.likelihood._target_)
    extra: dict[str, Any] = {"require_counts": bool(getattr(likelihood_cls, "requires_counts", 0))}
    if reference is not None:
        extra["reference"] = reference
    dm = instantiate(cfg.data, **extra)
    dm.setup("fit")
    model = DPVAE(n_genes=dm.n_genes, preprocess=dm.preprocessor.to_dict(), **to_plain(cfg.model))
    with torch.no_grad():  # PCA loadings fitted on the reference: encoder input, neighbour search
        for buffer, loadings in (
            ("pca", getattr(dm, "pca_components", None)),
            ("neighbour_pca", getattr(dm, "neighbour_components", None)),
        ):
            if loadings is not None:
                getattr(model.transform, buffer).copy_(
                    torch.as_tensor(loadings, dtype=torch.float32)
                )
    return dm, model


def callbacks_from_config(cfg: DictConfig) -> list[Any]:
    """Instantiate the ``callbacks`` section (entries set to null are skipped)."""
    out = []
    for spec in (cfg.get("callbacks") or {}).values():
        if spec is not None and spec.get("_target_"):
            out.append(instantiate(spec))
    return out


def fit(
    reference: ad.AnnData, overrides: Sequence[str] = (), callbacks: Sequence[Any] = ()
) -> tuple[DPVAE, Any]:
    """Train on an in-memory reference with the project's configuration plus ``overrides``.

    Nothing is written: no logger, no checkpoint files. Returns (model in eval mode, datamodule).
    """
    import lightning as L

    cfg = load_config(list(overrides))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    dm, model = build(cfg, reference)
    trainer_kwargs = to_plain(cfg.trainer)
    trainer_kwargs.update(enable_progress_bar=False, enable_model_summary=False)
    trainer = L.Trainer(
        **trainer_kwargs,
        logger=False,
        enable_checkpointing=False,
        callbacks=[*callbacks_from_config(cfg), *callbacks],
    )
    trainer.fit(model, datamodule=dm)
    return model.cpu().eval(), dm


def reference_latent(model: DPVAE, dm: Any, batch_size: int = 4096) -> tuple[np.ndarray, Any]:
    """Latent codes (training cells calibrated, see :func:`dpvae.solver.calibrate_in_sample`) and
    expression PCs of every reference cell of a fitted datamodule, in its cell order."""
    from dpvae.solver import calibrate_in_sample

    latent, pcs = model.embed(dm.raw, batch_size=batch_size, with_pcs=True)
    in_sample = np.zeros(len(latent), dtype=bool)
    in_sample[dm.train_idx] = True
    return calibrate_in_sample(latent, in_sample)[0], pcs


def fit_predict(
    reference: ad.AnnData,
    query: ad.AnnData,
    task: str = "impute",
    seed: int = 0,
    overrides: Sequence[str] = (),
) -> np.ndarray:
    """Train on ``reference`` and return the query cells' coordinates in the reference's frame.

    The held-out reference cells (``data.val_fraction``) calibrate the training cells' codes
    (:func:`reference_latent`). Both tasks place query cells against the reference; for
    ``transfer`` (the query is another section) the query's latent codes and expression PCs are
    first centred on the reference's (``align_query``), and only rotation-invariant scores are
    meaningful, which this satisfies.
    """
    from dpvae.predict import impute_coordinates

    if task not in ("impute", "transfer"):
        raise ValueError(f"task must be 'impute' or 'transfer', got {task!r}")
    model, dm = fit(reference, [f"seed={seed}", "logger=none", *overrides])
    ref_latent, ref_pcs = reference_latent(model, dm)
    coords, _ = impute_coordinates(
        model, query, ref_latent, dm.coords, ref_pcs=ref_pcs, align_query=task == "transfer"
    )
    return coords
