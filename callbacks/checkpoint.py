"""The run folder's checkpoints: ``model.ckpt`` (the model to use) and ``last.ckpt`` (to resume)."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """:class:`~lightning.pytorch.callbacks.ModelCheckpoint` with a run folder's stable names.

    Without ``monitor``, ``dirpath/model.ckpt`` is the latest epoch; with one (for example
    ``val/dist_pearson``, mode ``max``), ``model.ckpt`` is the best epoch and ``last.ckpt`` the
    latest, which a rerun of the same command resumes from. Training that writes no files
    (:func:`dpvae.fit`) leaves this callback out.

    Args:
        dirpath: the run folder.
        monitor: a logged metric, or ``None``.
        mode: ``min`` or ``max``.
        every_n_epochs: save every n-th epoch.
        every_n_seconds: without ``monitor``, write at most this often (the last epoch is always
            written): a checkpoint is a few MB and a few tens of ms, as long as a small array's
            epoch, and an interrupted run resumes exactly from whichever epoch was written, so a
            run loses at most this much work. 0: every ``every_n_epochs`` epochs. With
            ``monitor`` every improving epoch is written, as Lightning does.
    """

    def __init__(
        self,
        dirpath: str | Path,
        monitor: str | None = None,
        mode: str = "min",
        every_n_epochs: int = 1,
        every_n_seconds: float = 30.0,
    ) -> None:
        from dpvae.errors import check_checkpoint_options

        check_checkpoint_options(
            every_n_seconds=every_n_seconds, mode=mode, every_n_epochs=every_n_epochs
        )
        self.every_n_seconds = float(every_n_seconds)
        self._written_at = time.monotonic()
        self._wait = False
        super().__init__(
            dirpath=dirpath,
            filename="model",
            monitor=monitor,
            mode=mode,
            save_top_k=1,
            save_last=bool(monitor),
            every_n_epochs=every_n_epochs,
            enable_version_counter=False,
            auto_insert_metric_name=False,
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._written_at = time.monotonic()

    def _decide_wait(self, trainer: L.Trainer) -> None:
        """Whether this epoch's write waits for ``every_n_seconds``: rank 0's clock decides for
        every process (a write is collective under DDP)."""
        if self.monitor or not self.every_n_seconds:
            self._wait = False
            return
        # the last epoch is written at its end, as before (a checkpoint of on_train_end counts
        # one epoch more): the stopping rule has spoken by now (checkpoints run last)
        last = trainer.should_stop or (
            trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
        )
        last = last or (
            trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps
        )
        wait = not last and time.monotonic() - self._written_at < self.every_n_seconds
        self._wait = bool(trainer.strategy.broadcast(wait))

    def _should_skip_saving_checkpoint(self, trainer: L.Trainer) -> bool:
        return self._wait or super()._should_skip_saving_checkpoint(trainer)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self._written_at = time.monotonic()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_save_on_train_epoch_end(trainer):  # Lightning writes here, then
            self._decide_wait(trainer)
        super().on_validation_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._should_save_on_train_epoch_end(trainer):  # ... or here: decided once an epoch
            self._decide_wait(trainer)
        super().on_train_epoch_end(trainer, pl_module)
        # Lightning writes last.ckpt only in epochs whose monitored value improved; a resume must
        # start from the latest epoch, so write it every epoch the top-k check ran
        if (
            self.save_last
            and not self._should_skip_saving_checkpoint(trainer)
            and (trainer.current_epoch + 1) % max(self._every_n_epochs, 1) == 0
            and self._last_global_step_saved != trainer.global_step
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the final epoch is always on disk, whatever every_n_epochs or every_n_seconds skipped
        self._wait = False
        if trainer.global_step and self._last_global_step_saved != trainer.global_step:
            candidates = self._monitor_candidates(trainer)
            if self.monitor:
                self._save_last_checkpoint(trainer, candidates)
            else:
                self._save_topk_checkpoint(trainer, candidates)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a run of no step (fine-tuning whose cross-validation kept the starting model, or
        # trainer.max_epochs=0) still leaves its model to predict with
        if trainer.global_step == 0:
            trainer.save_checkpoint(
                Path(self.dirpath or ".") / f"{self.filename}.ckpt", weights_only=False
            )
