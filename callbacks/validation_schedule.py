"""Validate only on the epochs something reads, with the random stream of validating every epoch."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch


def reads_every(callback: Any) -> int:
    """Every how many epochs ``callback`` reads a validation's results: its ``validation_every``
    (0: never); 1 for a callback that does not say (it may read every one)."""
    every = getattr(callback, "validation_every", 1)
    return max(0, int(every or 0))


class ValidationSchedule(L.Callback):
    """Skip the validation passes nothing reads.

    A validation pass computes the held-out cells' loss terms. Loggers read every one (the
    curves), and so may any callback; dpvae's stopping rule and spatial scores read only every
    ``every_n_epochs``-th epoch (5), and the spatial scores also the last. Training in memory
    (:func:`dpvae.fit`: no logger) with only those readers validated 8 epochs in 10 for nothing: on
    a 250-spot array that is a fifth of the validation passes' 0.3 s. Once every callback is set
    up, this sets ``trainer.check_val_every_n_epoch`` to the greatest common divisor of the
    readers' periods (:func:`reads_every`), where ``trainer.max_epochs`` is a multiple of it (so
    that the last epoch is validated), and leaves the trainer's setting alone under a logger, an
    unknown callback, a step limit or a validation schedule of the user's own.

    A validation pass draws one number of torch's global generator (its ``DataLoader`` iterator's
    base seed), so validating less often would change every random number of the training after
    it, and the trained model. On a skipped epoch this draws that number at the moment validation
    would have (after the epoch's last batch): the model and every random number are the same as
    when validating every epoch (``tests/test_validation_schedule.py`` checks it, weights and
    stopping epoch). Drop the callback (``callbacks.validation=null``) to validate every epoch.
    """

    validation_every = 0  # reads no validation itself

    def __init__(self) -> None:
        super().__init__()
        self.every = 1

    @staticmethod
    def period(trainer: L.Trainer) -> int:
        """Every how many epochs ``trainer`` needs to validate (1: every epoch)."""
        if trainer.loggers or trainer.check_val_every_n_epoch != 1:
            return 1
        if trainer.val_check_interval != 1.0 or trainer.max_steps not in (-1, None):
            return 1
        max_epochs = trainer.max_epochs
        if not isinstance(max_epochs, int) or max_epochs < 1:
            return 1
        periods = [p for p in map(reads_every, trainer.callbacks) if p > 0]  # type: ignore[attr-defined]
        every = math.gcd(*periods) if periods else max_epochs
        return every if every > 1 and max_epochs % every == 0 else 1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after every callback's setup (SpatialValidation may have chosen every epoch there),
        # once Lightning has counted the validation batches
        self.every = self.period(trainer) if _validates(trainer) else 1
        if self.every > 1:  # (period() is 1 unless the trainer's setting is 1, its default)
            trainer.check_val_every_n_epoch = self.every

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.every == 1 or batch_idx + 1 != trainer.num_training_batches:
            return
        if (trainer.current_epoch + 1) % self.every == 0:
            return
        torch.empty((), dtype=torch.int64).random_()  # the skipped pass's loader seed

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore(trainer)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore(trainer)

    def _restore(self, trainer: L.Trainer) -> None:
        if self.every > 1:
            trainer.check_val_every_n_epoch = 1
        self.every = 1


def _validates(trainer: L.Trainer) -> bool:
    """Whether an epoch's end would run a validation pass over at least one batch (Lightning counts
    the validation batches before ``on_train_start``, with or without a sanity check)."""
    batches = trainer.num_val_batches
    return bool(trainer.enable_validation) and any(n > 0 for n in batches)
