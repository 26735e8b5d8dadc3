"""Early stopping that waits until the distance regularizer is on."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping


class WarmupEarlyStopping(EarlyStopping):
    """:class:`lightning.pytorch.callbacks.EarlyStopping` that ignores the plain-VAE warm-up epochs.

    During ``model.warmup_epochs`` the model is not yet distance-preserving, so its spatial scores
    say nothing about when to stop; patience only starts counting once the regularizer is on.
    Takes the keyword arguments of ``EarlyStopping``; ``monitor=None`` turns it off.
    """

    def __init__(self, monitor: str | None = None, **kwargs: Any) -> None:
        self.enabled = bool(monitor)
        super().__init__(monitor=monitor or "val/loss", **kwargs)

    @staticmethod
    def _in_warmup(pl_module: L.LightningModule) -> bool:
        warmup = int(getattr(pl_module, "hparams", {}).get("warmup_epochs", 0))
        return pl_module.current_epoch < warmup

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled and not self._in_warmup(pl_module):
            super().on_validation_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled and not self._in_warmup(pl_module):
            super().on_train_epoch_end(trainer, pl_module)
