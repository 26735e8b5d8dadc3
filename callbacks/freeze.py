"""Keep parts of a model fixed while the rest trains (fine-tuning to a new section)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn

from dpvae.errors import ConfigError


class Freeze(BaseFinetuning):
    """Freeze the named submodules for the whole run (Lightning's fine-tuning mechanism).

    scArches-style reference mapping keeps most of a trained network fixed and adapts the rest to
    the new data; here ``modules`` names what stays fixed, as dotted paths into the model
    (``encoder``, ``encoder.body.0`` (the encoder's first layer), ``decoder``, ``likelihood``,
    ``regularizer``). Frozen parameters get no gradient and their batch-norm statistics stay
    those of the original training. Empty: nothing is frozen (the callback does nothing).

    Args:
        modules: dotted names of the submodules to freeze.
    """

    validation_every = 0  # reads no validation (ValidationSchedule)

    def __init__(self, modules: Sequence[str] = ()) -> None:
        super().__init__()
        self.modules = [str(m) for m in modules]

    def check_model(self, model: nn.Module) -> None:
        """Every name is a submodule of ``model`` (before anything is written).

        Raises:
            ConfigError: naming the unknown module and the ones there are.
        """
        have = dict(model.named_modules())
        for name in self.modules:
            if name not in have or not name:
                tops = ", ".join(n for n, _ in model.named_children())
                raise ConfigError(
                    f"callbacks.freeze.modules names {name!r}, which the model does not have; "
                    f"give dotted module names such as {tops} or encoder.body.0"
                )

    def _targets(self, pl_module: L.LightningModule) -> list[nn.Module]:
        have = dict(pl_module.named_modules())
        return [have[name] for name in self.modules if name in have]

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        if self.modules:
            self.check_model(pl_module)
            self.freeze(self._targets(pl_module), train_bn=False)

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: Any) -> None:
        """Nothing is unfrozen during the run."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning puts the whole model in training mode every epoch: frozen batch norms go back
        # to evaluation mode so that they keep the original statistics
        super().on_train_epoch_start(trainer, pl_module)
        for module in self._targets(pl_module):
            for sub in module.modules():
                if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                    sub.eval()
