"""Train a dp-VAE: ``python train.py key=value ...`` (see conf/train.yaml and the README).

With no arguments it trains on the embedded osmFISH dataset. Writes ``run_dir/model.ckpt``,
``run_dir/config.yaml`` and ``run_dir/embedding.h5ad``; rerunning the same command resumes an
interrupted run from its checkpoint.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any

CONF_DIR = Path(__file__).resolve().parent / "conf"


def _checkpoint_to_resume(run_dir: Path, resume: bool) -> Path | None:
    from dpvae.errors import ConfigError

    existing = [p for p in (run_dir / "last.ckpt", run_dir / "model.ckpt") if p.exists()]
    if not existing:
        return None
    if not resume:
        raise ConfigError(
            f"{run_dir} already holds {existing[0].name}; choose another run_dir, or resume=true "
            "to continue that run"
        )
    return existing[0]


def _callbacks(cfg: Any, run_dir: Path) -> list[Any]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from callbacks import WarmupEarlyStopping
    from dpvae.api import callbacks_from_config

    monitor = cfg.checkpoint.monitor
    callbacks: list[Any] = [
        ModelCheckpoint(
            dirpath=run_dir,
            filename="model",
            monitor=monitor,
            mode=cfg.checkpoint.mode,
            save_top_k=1,
            save_last=bool(monitor),
            every_n_epochs=cfg.checkpoint.every_n_epochs,
            enable_version_counter=False,
            auto_insert_metric_name=False,
        )
    ]
    if cfg.early_stopping.monitor:
        callbacks.append(
            WarmupEarlyStopping(
                monitor=cfg.early_stopping.monitor,
                patience=cfg.early_stopping.patience,
                mode=cfg.early_stopping.mode,
            )
        )
    return [*callbacks, *callbacks_from_config(cfg)]


def _write_embedding(model: Any, dm: Any, path: Path, batch_size: int) -> None:
    import anndata as ad
    import numpy as np
    import pandas as pd

    from dpvae.io import write_h5ad_atomic

    # the model's codes as they are; prediction calibrates the "train" rows against the "val" ones
    latent, pcs = model.embed(dm.raw, batch_size=batch_size, with_pcs=True)
    split = np.full(len(latent), "train", dtype=object)
    split[dm.val_idx] = "val"
    out = ad.AnnData(
        X=latent.astype(np.float32),
        obs=pd.DataFrame({"split": pd.Categorical(split)}, index=dm.cell_names),
        var=pd.DataFrame(index=[f"latent_{i}" for i in range(latent.shape[1])]),
    )
    out.obsm["spatial"] = dm.coords
    if pcs is not None:
        out.obsm["X_expr_pcs"] = pcs  # the expression PCs prediction joins to the latent code
    out.uns["dpvae"] = {"lambda": model.scale_value(), "genes": model.genes}
    write_h5ad_atomic(out, path)


def run(overrides: list[str]) -> Path:
    """Compose the config from ``overrides``, train, and return the run folder."""
    import lightning as L
    import torch
    from lightning.pytorch.utilities import rank_zero_only
    from omegaconf import OmegaConf

    from dpvae.api import build
    from dpvae.config import instantiate, load_config, to_plain
    from dpvae.module import DPVAE

    cfg = load_config(overrides, conf_dir=CONF_DIR)
    run_dir = Path(cfg.run_dir).expanduser().resolve()
    resume_from = _checkpoint_to_resume(run_dir, bool(cfg.resume))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))

    dm, model = build(cfg)

    logger: Any = False
    if cfg.logger is not None and cfg.logger.get("_target_"):
        logger = instantiate(cfg.logger)
    if getattr(rank_zero_only, "rank", 0) == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml")
        if logger:
            logger.log_hyperparams(to_plain(cfg))
        where = f"resuming from {resume_from}" if resume_from else "training"
        print(
            f"dpvae: {where}: {dm.n_genes} genes, {len(dm.train_idx)} train / "
            f"{len(dm.val_idx)} validation cells -> {run_dir}",
            file=sys.stderr,
        )

    trainer = L.Trainer(
        **to_plain(cfg.trainer),
        logger=logger,
        callbacks=_callbacks(cfg, run_dir),
        default_root_dir=str(run_dir),
    )
    trainer.fit(model, datamodule=dm, ckpt_path=str(resume_from) if resume_from else None)

    if trainer.is_global_zero and cfg.embedding.write:
        ckpt_cb = trainer.checkpoint_callback
        best = getattr(ckpt_cb, "best_model_path", "") if cfg.checkpoint.monitor else ""
        final = DPVAE.load_from_checkpoint(best, map_location="cpu") if best else model.cpu()
        _write_embedding(final, dm, run_dir / "embedding.h5ad", cfg.embedding.batch_size)
        print(
            f"dpvae: wrote {run_dir / 'model.ckpt'}, config.yaml, embedding.h5ad", file=sys.stderr
        )
    return run_dir


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: one line and exit status 2 for a user error, no traceback."""
    from dpvae.errors import DPVAEError

    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    try:
        run(list(sys.argv[1:] if argv is None else argv))
    except DPVAEError as exc:
        print(f"dpvae: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dpvae: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
