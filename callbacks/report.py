"""What a user sees during training: the scores on screen, the warm-up switch, a summary and a
``training.png`` of the run's curves."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import lightning as L

from dpvae.metrics import format_scores

from .spatial_validation import SpatialValidation

#: per-epoch values recorded, as logged (``_epoch`` suffixes of step-and-epoch logs removed)
CURVES = {
    "train/loss": "train/loss_epoch",
    "train/recon": "train/recon_epoch",
    "train/kl": "train/kl_epoch",
    "train/reg": "train/reg_epoch",
    "train/lambda": "train/lambda_epoch",
    "val/loss": "val/loss",
}
SPATIAL = ("dist_pearson", "knn10", "median_error", "distortion_p95_p5")


def stopped_early(trainer: L.Trainer) -> str:
    """``"; stopped early ..."`` when an early-stopping callback ended the run, else ``""``."""
    from lightning.pytorch.callbacks import EarlyStopping
    from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason

    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(cb, EarlyStopping) and cb.stopped_epoch > 0:
            every = getattr(cb, "every_n_epochs", 1)
            why = f"{cb.monitor} no better for {cb.patience} checks" + (
                f" ({cb.patience * every} epochs)" if every > 1 else ""
            )
            if cb.stopping_reason == EarlyStoppingReason.NON_FINITE_METRIC:
                why = f"{cb.monitor} is not finite"
            # epochs trained (a trainer.min_epochs may go on past the decision)
            last = max(trainer.current_epoch, cb.stopped_epoch + 1)
            return (
                f"; stopped early after epoch {last} of {trainer.max_epochs}: {why} "
                "(callbacks.early_stopping.monitor=null runs them all)"
            )
    return ""


class Report(L.Callback):
    """Prints the run's progress in plain lines and draws ``dirpath/training.png`` at the end.

    - every validation with spatial scores prints one line (``val`` dist_pearson, knn10,
      median_error in cell spacings, distortion p95/p5); when the output is not a terminal (a
      log file, a batch job) every epoch prints one line and the progress bar is off;
    - the epoch where the distance regularizer switches on says so (the loss jumps then);
    - the end of training prints the best and last scores, lambda and where the files are.

    The history is kept in checkpoints, so a resumed run's figure covers all its epochs.

    Args:
        dirpath: where ``training.png`` goes; ``None`` draws nothing.
        every_epoch: print a line every epoch (``None``: when the output is not a terminal).
    """

    writes_files = True

    def __init__(self, dirpath: str | Path | None = None, every_epoch: bool | None = None) -> None:
        super().__init__()
        self.dirpath = Path(dirpath).expanduser().resolve() if dirpath else None
        self.every_epoch = every_epoch
        self.history: list[dict[str, float]] = []

    def _say(self, trainer: L.Trainer, text: str) -> None:
        if not trainer.is_global_zero:
            return
        from tqdm import tqdm  # Lightning's progress bar: write above it, never through it

        tqdm.write(f"dpvae: {text}", file=sys.stderr)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        warmup = int(pl_module.hparams.get("warmup_epochs", 0))
        alpha = float(pl_module.hparams.get("alpha", 0.0))
        from dpvae.regularizers import NoRegularizer

        plain = isinstance(getattr(pl_module, "regularizer", None), NoRegularizer)
        if warmup and trainer.current_epoch == warmup and alpha > 0 and not plain:
            self._say(
                trainer,
                f"epoch {warmup + 1}: the distance regularizer switches on (weight {alpha:g}) "
                f"after {warmup} warm-up epochs of plain VAE, so the training loss now includes "
                "it and jumps",
            )

    def _spatial(self, trainer: L.Trainer) -> dict[str, float]:
        scores = SpatialValidation.placed_now(trainer) or {}
        return {k: v for k, v in scores.items() if k in SPATIAL}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        row = {"epoch": float(trainer.current_epoch)}
        for name, key in CURVES.items():
            if key in metrics:
                row[name] = float(metrics[key])
        spatial = self._spatial(trainer)
        row.update({f"val/{k}": v for k, v in spatial.items()})
        self.history.append(row)
        every = self.every_epoch if self.every_epoch is not None else not sys.stderr.isatty()
        if not (spatial or every):
            return
        total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?"
        text = f"epoch {trainer.current_epoch + 1}/{total}"
        if "train/loss" in row:
            text += f"  loss {row['train/loss']:.3f}"
        if "val/loss" in row:
            text += f"  val_loss {row['val/loss']:.3f}"
        if "train/lambda" in row:
            text += f"  lambda {row['train/lambda']:.3g}"
        if spatial:
            text += "  | val " + format_scores(spatial)
        self._say(trainer, text)

    def summary(self) -> str:
        """Best and last validation scores and the last lambda, in one line."""
        scored = [r for r in self.history if "val/dist_pearson" in r]
        if not scored:
            return f"{len(self.history)} epochs (no spatial validation scores)"
        best = max(scored, key=lambda r: r["val/dist_pearson"])
        last = scored[-1]
        text = (
            f"{len(self.history)} epochs; val dist_pearson best {best['val/dist_pearson']:.3f} "
            f"(epoch {int(best['epoch']) + 1}), last {last['val/dist_pearson']:.3f}; last: "
            + format_scores(
                {
                    k[4:]: v
                    for k, v in last.items()
                    if k.startswith("val/") and k[4:] in SPATIAL and k != "val/dist_pearson"
                }
            )
        )
        if "train/lambda" in self.history[-1]:
            text += f"; lambda {self.history[-1]['train/lambda']:.3g}"
        return text

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        where = f" -> {self.dirpath}" if self.dirpath else ""
        if not self.history:  # a fit of no epoch (fine-tuning's cross-validation can choose 0)
            self._say(trainer, f"done: 0 epochs, the model as it started{where}")
            return
        self._say(trainer, f"done: {self.summary()}{stopped_early(trainer)}{where}")
        if self.dirpath is not None:
            from dpvae.plotting import plot_training

            warmup = int(pl_module.hparams.get("warmup_epochs", 0))
            plot_training(self.history, self.dirpath / "training.png", warmup)

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(r) for r in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [
            {k: float(v) for k, v in r.items() if not math.isnan(float(v))}
            for r in state_dict.get("history", [])
        ]
