"""Loggers as dpvae runs them."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger


class WandbLogger(_LightningWandbLogger):
    """Lightning's :class:`~lightning.pytorch.loggers.WandbLogger`, minus the ``anonymous`` key
    it always passes to ``wandb.init`` (which wandb >= 0.19 answers with a warning a user cannot
    act on). Takes the same arguments; ``id`` resumes a run folder's W&B run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
