"""Keep the weights of the best validation epoch in memory and restore them when training ends."""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning as L
import torch


class BestWeights(L.Callback):
    """Restore the weights of the epoch with the best ``monitor`` value at the end of ``fit``.

    The in-memory counterpart of a monitored checkpoint, for training that writes no files
    (:func:`dpvae.fit`) and for the embedding a run writes at its end. Under DDP every rank sees the same synchronised value and restores the
    same weights.

    Args:
        monitor: a logged metric, e.g. ``val/dist_pearson``; ``None`` disables the callback.
        mode: ``max`` or ``min``.
    """

    def __init__(self, monitor: str | None = "val/dist_pearson", mode: str = "max") -> None:
        from dpvae.errors import check_best_options

        super().__init__()
        check_best_options(mode=mode)
        self.monitor = monitor
        self.mode = mode
        self.best = -math.inf if mode == "max" else math.inf
        self.best_epoch = -1
        self._state: dict[str, Any] | None = None

    @property
    def validation_every(self) -> int:
        """It reads every validation when it monitors (:class:`ValidationSchedule`)."""
        return 1 if self.monitor else 0

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (
            trainer.sanity_checking
            or not self.monitor
            or self.monitor not in trainer.callback_metrics
        ):
            return
        value = float(trainer.callback_metrics[self.monitor])
        better = value > self.best if self.mode == "max" else value < self.best
        if math.isfinite(value) and better:
            self.best, self.best_epoch = value, trainer.current_epoch
            self._state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints, so a resumed run restores the same best epoch."""
        return {"best": self.best, "best_epoch": self.best_epoch, "weights": self._state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = float(state_dict["best"])
        self.best_epoch = int(state_dict["best_epoch"])
        self._state = state_dict["weights"]

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._state is not None:
            with torch.no_grad():
                pl_module.load_state_dict(copy.deepcopy(self._state))
