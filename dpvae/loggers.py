"""Loggers as dpvae runs them."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter as _ExperimentWriter


class WandbLogger(_LightningWandbLogger):
    """Lightning's :class:`~lightning.pytorch.loggers.WandbLogger`, minus the ``anonymous`` key
    it always passes to ``wandb.init`` (which wandb >= 0.19 answers with a warning a user cannot
    act on). Takes the same arguments; ``id`` resumes a run folder's W&B run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)


class CSVLogger(_LightningCSVLogger):
    """Lightning's :class:`~lightning.pytorch.loggers.CSVLogger`, appending to the run's
    ``metrics.csv`` instead of deleting it when a run is resumed (one log per run folder; the rows
    of epochs a resume replays are trimmed first, :func:`dpvae.run_folder.trim_csv_logs`)."""

    @property
    def experiment(self) -> Any:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class _AppendingWriter(_ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        import csv
        import os

        if os.path.isfile(self.metrics_file_path):  # keep it, and its columns
            with open(self.metrics_file_path, newline="") as fh:
                self.metrics_keys = sorted(next(csv.reader(fh), []))
