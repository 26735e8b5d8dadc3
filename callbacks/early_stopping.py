"""Early stopping that waits until the distance regularizer is on and checks where a score exists."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping

from .spatial_validation import SpatialValidation


class WarmupEarlyStopping(EarlyStopping):
    """:class:`lightning.pytorch.callbacks.EarlyStopping` that ignores the plain-VAE warm-up epochs,
    checks every ``every_n_epochs`` epochs, and checks a spatial score only where it exists.

    During ``model.warmup_epochs`` the model is not yet distance-preserving, so its scores say
    nothing about when to stop; patience only starts counting once the regularizer is on. The
    check runs on every ``every_n_epochs``-th epoch (``patience`` counts checks), and on a
    monitor of :class:`SpatialValidation` (``val/dist_pearson``, ...) only on the epochs it placed
    the validation cells (``callbacks.spatial.every_n_epochs``): Lightning's own callback would
    count the epochs in between, reading the last placement's value again.

    The default rule (``conf/train.yaml``, chosen on the dev benchmark with
    ``python -m benchmarks.stopping``): at every 5th epoch (5, 10, ...) once the warm-up is over,
    stop once the held-out cells' ``val/loss`` has not fallen for 2 checks. Takes the keyword
    arguments of ``EarlyStopping``; ``monitor=None`` turns it off (the fixed schedule,
    ``trainer.max_epochs``).
    """

    def __init__(
        self,
        monitor: str | None = "val/loss",
        every_n_epochs: int = 5,
        patience: int = 2,
        min_delta: float = 0.0,
        mode: str = "min",
        **kwargs: Any,
    ) -> None:
        from dpvae.errors import check_stopping_options

        check_stopping_options(every_n_epochs=every_n_epochs, patience=patience, mode=mode)
        self.enabled = bool(monitor)
        self.every_n_epochs = int(every_n_epochs)
        self._key_for: tuple[str, str] | None = None  # (monitor, mode) of the cached state_key
        self._key = ""
        super().__init__(
            monitor=monitor or "val/loss",
            patience=patience,
            min_delta=min_delta,
            mode=mode,
            **kwargs,
        )

    @property
    def validation_every(self) -> int:
        """Epochs between the validations it reads (:class:`ValidationSchedule`; 0: disabled)."""
        return self.every_n_epochs if self.enabled else 0

    @property
    def state_key(self) -> str:
        """Lightning's key (the class name with monitor and mode), built once per value: Lightning
        reads it at every callback hook, about six times a training step."""
        values = (self.monitor, self.mode)
        if self._key_for != values:
            self._key_for = values
            self._key = self._generate_state_key(monitor=self.monitor, mode=self.mode)
        return self._key

    @property
    def spatial(self) -> bool:
        """The monitor is one of :class:`SpatialValidation`'s scores."""
        return self.monitor.startswith("val/") and self.monitor[4:] in SpatialValidation.METRICS

    @staticmethod
    def _in_warmup(pl_module: L.LightningModule) -> bool:
        warmup = int(getattr(pl_module, "hparams", {}).get("warmup_epochs", 0))
        return pl_module.current_epoch < warmup

    def _due(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        if not self.enabled or self._in_warmup(pl_module):
            return False
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return False
        return not self.spatial or SpatialValidation.placed_now(trainer) is not None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A checkpoint's progress (best, wait, stop), but the configured ``patience``: Lightning
        would restore the saved one, so a resumed run could not change it."""
        patience = self.patience
        super().load_state_dict(state_dict)
        self.patience = patience

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # resumed from a checkpoint of a run this rule ended (say, interrupted before its
        # embedding was written): it stays ended instead of training on to the next check
        if self.enabled and self.stopped_epoch > 0:
            trainer.should_stop = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._due(trainer, pl_module):
            super().on_validation_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._due(trainer, pl_module):
            super().on_train_epoch_end(trainer, pl_module)
