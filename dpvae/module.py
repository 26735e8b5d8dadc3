"""The dp-VAE LightningModule: encoder + decoder + likelihood + distance regularizer.

Loss per batch::

    loss = (reconstruction + beta * KL) / n_genes + alpha * regularizer

The reconstruction (negative log-likelihood summed over genes) and the KL divergence are divided by
the number of genes, so that ``alpha`` means the same whatever the gene panel; the regularizer is
off (weight 0, still logged) for the first ``warmup_epochs`` epochs of plain VAE training. When it
switches on, lambda is re-initialised from the median ratio of latent to spatial distance in that
batch (with a weighted pair set: the median weighted by pair weight times spatial distance, the
lambda that minimises the weighted absolute gap), averaged over processes so every DDP rank starts
from the same value.

The regularizer scores the batch's own pair set when the sampler attached one (``batch["pairs"]``
(2, P) positions and ``batch["pair_weight"]`` (P,), see :mod:`dpvae.datamodules.sampling`), and
every in-batch pair with equal weight otherwise (:func:`batch_pairs`).

Hyperparameters are plain data (component specs with ``_target_``, the preprocessing state), so
``DPVAE.load_from_checkpoint(path)`` rebuilds the model on its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from dpvae.network import OPTIMIZERS as OPTIMIZERS  # re-exported
from dpvae.network import Parts, model_hparams
from dpvae.preprocess import Preprocessor
from dpvae.regularizers.base import (
    accepts_weight,
    all_pairs,
    pair_distances,
    some_pairs,
    spatial_distances,
)

#: the logged terms, in the order of :meth:`DPVAE._term_values` (lambda: scaled regularizers)
TERM_NAMES = ("recon", "kl", "reg", "loss", "lambda")
#: devices torch has a fused AdamW kernel for (others fall back to ``foreach``)
FUSED_DEVICES = ("cpu", "cuda")


def batch_pairs(coords: Tensor, min_distance: float = 1e-12) -> Tensor:
    """All index pairs ``i < j`` of a batch whose cells are at distinct positions, shape (2, P),
    in :func:`torch.pdist`'s order. When no two cells coincide that is the shared tensor of
    :func:`dpvae.regularizers.base.all_pairs`, which the pair distances then read without a
    gather; else :func:`dpvae.regularizers.base.some_pairs`, whose positions they read at."""
    pairs = all_pairs(coords.shape[0], coords.device)
    keep = spatial_distances(coords, pairs) > min_distance
    if bool(keep.all()):
        return pairs
    return some_pairs(keep, coords.shape[0])


def weighted_median(values: Tensor, weight: Tensor) -> Tensor:
    """The lower weighted median: the smallest value whose cumulative weight reaches half."""
    order = torch.argsort(values)
    cum = torch.cumsum(weight[order], dim=0)
    k = torch.searchsorted(cum, 0.5 * cum[-1]).clamp_max(len(values) - 1)
    return values[order][k]


def batch_pair_set(
    batch: Mapping[str, Tensor], coords: Tensor, min_distance: float = 1e-12
) -> tuple[Tensor, Tensor | None]:
    """The pairs the regularizer scores and their weights (``None``: equal).

    The batch's own pair set (``batch["pairs"]``, ``batch["pair_weight"]``) when it has one, less
    any pair of cells at the same position; else every in-batch pair (:func:`batch_pairs`).
    """
    if "pairs" not in batch:
        return batch_pairs(coords, min_distance), None
    pairs = batch["pairs"].to(coords.device)
    weight = batch.get("pair_weight")
    keep = spatial_distances(coords, pairs) > min_distance
    if weight is not None:
        weight = weight.to(device=coords.device, dtype=coords.dtype)[keep]
    return pairs[:, keep], weight


class DPVAE(Parts, L.LightningModule):
    """Distance-preserving VAE.

    Args:
        n_genes: number of input genes (``len(preprocess.genes)``).
        preprocess: the fitted :class:`~dpvae.preprocess.Preprocessor` (its loadings are copied
            into the model's state), or its :meth:`~dpvae.preprocess.Preprocessor.to_dict` when a
            checkpoint's state supplies them.
        encoder, decoder, likelihood, regularizer: component specs, mappings with ``_target_`` and
            keyword arguments (the ``conf/model/*`` YAML files).
        latent_dim: latent dimension.
        beta: weight of the KL divergence.
        alpha: weight of the distance regularizer once it is on.
        warmup_epochs: epochs of plain VAE training before the regularizer switches on.
        lr, weight_decay: AdamW settings.
        optimizer: AdamW's implementation: ``fused`` (one kernel per step over all parameters
            where torch has one for their device: CPU and CUDA; else ``foreach``), ``foreach``
            (one vectorised call per operation, the same numbers as ``loop``), ``loop`` (torch's
            per-parameter loop, its default on CPU). Fused and the others agree to rounding.
        distance_on: ``mean`` (the posterior mean, the embedding used for prediction) or ``sample``
            (a reparameterised sample) enters the regularizer.

    The keywords after ``preprocess`` are :func:`dpvae.network.model_hparams`'s, with its
    defaults; an unknown one is a ``TypeError``.
    """

    def __init__(
        self, n_genes: int, preprocess: Preprocessor | Mapping[str, Any], **kwargs: Any
    ) -> None:
        super().__init__()
        hparams, pre = model_hparams(n_genes, preprocess, **kwargs)
        self.save_hyperparameters(hparams)
        self._build_parts(hparams, pre)
        # a user-written forward(z, coords, pairs) without weights gets weight-resampled pairs
        self._weighted_regularizer = accepts_weight(self.regularizer)
        # per-stage sums of the logged terms (times batch size) and cell counts this epoch
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}
        # per stage, the epoch's row of means not yet written and values callbacks added to it
        self._rows: dict[str, dict[str, Tensor]] = {}
        self._extra: dict[str, dict[str, Tensor]] = {}

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning writes the hook's name here before and after every hook (about 40 times a
        # training step); it is a plain attribute, never a parameter, buffer or submodule, so
        # nn.Module's bookkeeping for those (1.2 us a write) is skipped for it
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # ------------------------------------------------------------------ model
    def regularizer_on(self) -> bool:
        """Whether the distance term is part of the training loss in the current epoch."""
        return self.current_epoch >= self.hparams["warmup_epochs"]

    def _losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        raw, coords = batch["raw"], batch["coords"]
        x, mu, logvar, library = self._encode(raw)
        if self.training:
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        else:
            z = mu
        decoded = self.decoder(z)
        target = raw if self.likelihood.requires_counts else x
        n_genes = self.hparams["n_genes"]
        recon = self.likelihood.nll(decoded, target, library).mean() / n_genes
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=-1).mean() / n_genes
        emb = mu if self.hparams["distance_on"] == "mean" else z
        pairs, weight = batch_pair_set(batch, coords)
        if "section" in batch:  # sections are unrelated frames: no pair crosses two
            section = batch["section"].to(pairs.device)
            same = section[pairs[0]] == section[pairs[1]]
            pairs = pairs[:, same]
            weight = None if weight is None else weight[same]
        if pairs.shape[1] == 0:
            reg = emb.sum() * 0.0
        else:
            if self.training and self.regularizer_on() and not bool(self.scale_initialised):
                self._init_scale(emb.detach(), coords, pairs, weight)
            reg = self._regularize(emb, coords, pairs, weight)
        out = {"recon": recon, "kl": kl, "reg": reg}
        out["elbo_loss"] = recon + self.hparams["beta"] * kl
        return out

    def _regularize(
        self, emb: Tensor, coords: Tensor, pairs: Tensor, weight: Tensor | None
    ) -> Tensor:
        if weight is None:
            return self.regularizer(emb, coords, pairs)
        if self._weighted_regularizer:
            return self.regularizer(emb, coords, pairs, weight=weight)
        # forward(z, coords, pairs) without weights: as many pairs drawn in proportion to their
        # weights, so that its mean over them is the weighted term in expectation
        drawn = torch.multinomial(weight, pairs.shape[1], replacement=True)
        return self.regularizer(emb, coords, pairs[:, drawn])

    def _init_scale(
        self, emb: Tensor, coords: Tensor, pairs: Tensor, weight: Tensor | None = None
    ) -> None:
        dz, d = pair_distances(emb, coords, pairs)
        ratios = dz / d.clamp_min(1e-12)
        if weight is None:
            ratio = torch.median(ratios)
        else:
            # the lambda minimising sum w |dz - lambda d| = sum w d |dz / d - lambda|: short pairs,
            # however heavily weighted, barely move the scale
            ratio = weighted_median(ratios, weight * d)
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            ratio = trainer.strategy.reduce(ratio, reduce_op="mean")
        self.regularizer.reset_scale(float(ratio))
        self.scale_initialised.fill_(True)
        # lambda's optimizer state counted the warm-up's steps, in which its gradient was 0 (the
        # term's weight is 0): AdamW's bias correction then sized its first steps after the
        # switch by the warm-up's length (0.44 x the learning rate after 20 warm-up steps, 1.4 x
        # after 230). With its new value it starts afresh, as a parameter first trained now.
        if trainer is not None:
            own = list(self.regularizer.parameters())
            for optimizer in trainer.optimizers:
                for p in own:
                    optimizer.state.pop(p, None)

    # ---------------------------------------------------------------- logging
    # Lightning's self.log costs about half a millisecond a value (it moves the key's result
    # metric, walking its whole state, on every call): six a step were most of a small batch's
    # step, and a dozen an epoch were 15% of a 250-spot array's fit. The terms are summed here
    # instead, on the device, without a host sync, and the values (final: epoch means already
    # reduced over DDP ranks, or one step's) go to the trainer directly, where self.log's would
    # have gone, at the same moments and steps: trainer.callback_metrics (what callbacks such as
    # early stopping and checkpointing read), the progress bar, and the loggers through the
    # trainer's logger connector (Lightning's own step and "epoch" keys, rank zero only). A
    # training step's values go out on the steps the logger writes
    # (trainer.log_every_n_steps); an epoch's batch-size-weighted means once, in callback_metrics
    # at its last batch (so that callbacks' on_train_epoch_end see them) and to the loggers at
    # its end. The keys: train/X_step and train/X_epoch, as on_step + on_epoch logging named
    # them, and val/X (validation logs epoch means only), in one row with the values callbacks
    # add with :meth:`add_epoch_values` (the spatial scores).

    def _term_values(self, terms: Mapping[str, Tensor], loss: Tensor) -> Tensor:
        """(recon, kl, reg, loss[, lambda]) of a batch as one detached float64 vector."""
        parts = [terms["recon"], terms["kl"], terms["reg"], loss]
        lam = self.regularizer.scale()
        if lam is not None:
            parts.append(lam)
        return torch.stack([p.detach().reshape(()) for p in parts]).double()

    def _accumulate(self, stage: str, values: Tensor, n: int) -> None:
        sums = self._sums.get(stage)
        self._sums[stage] = values * n if sums is None else sums + values * n
        self._counts[stage] = self._counts.get(stage, 0) + n

    def _hand_over(
        self,
        values: dict[str, Tensor],
        bar: dict[str, Tensor] | None = None,
        write: bool = True,
        epoch_end: bool = False,
    ) -> None:
        """``values`` to the trainer's callback metrics (and ``bar`` to its progress bar), and with
        ``write`` to its loggers, as one row: at the logger connector's step, or with
        ``epoch_end`` at the epoch's last step (where Lightning writes a training epoch's row)."""
        trainer = self._trainer
        if trainer is None:
            return
        trainer.callback_metrics.update(values)
        if bar:
            trainer.callback_metrics.update(bar)
            trainer.progress_bar_metrics.update({k: float(v) for k, v in bar.items()})
        if not (write and values) or trainer.sanity_checking:
            return
        if epoch_end:
            row: dict[str, Any] = {**values, "epoch": trainer.current_epoch}
            trainer._logger_connector.log_metrics(row, step=max(trainer.global_step - 1, 0))
        else:
            trainer._logger_connector.log_metrics(values)

    def add_epoch_values(self, stage: str, values: Mapping[str, float]) -> None:
        """Values of this epoch's ``stage`` computed elsewhere (a callback's scores, the same on
        every rank): to the callback metrics now, to the loggers in the row of the stage's means.

        Call it from a callback's ``on_validation_epoch_end`` (stage ``"val"``) or, for
        ``"train"``, before the module's ``on_train_epoch_end`` (a callback's
        ``on_train_epoch_end`` runs first); later the row has been written and the values
        reach the callback metrics only (``self.log`` still works from anywhere)."""
        tensors = {k: torch.tensor(float(v), device=self.device) for k, v in values.items()}
        self._extra.setdefault(stage, {}).update(tensors)
        self._hand_over(tensors, write=False)

    def _flush(self, stage: str) -> None:
        """The epoch's weighted means of ``stage`` (summed over DDP ranks) to the callback
        metrics, their row kept for :meth:`_write`; the sums reset."""
        sums = self._sums.pop(stage, None)
        count = self._counts.pop(stage, 0)
        if sums is None or count == 0:
            return
        trainer = self._trainer
        total = torch.cat([sums, sums.new_tensor([count])])
        if trainer is not None and trainer.world_size > 1:
            total = trainer.strategy.reduce(total, reduce_op="sum")
        means = (total[:-1] / total[-1]).float()
        names = TERM_NAMES[: len(means)]
        suffix = "_epoch" if stage == "train" else ""
        row = {f"{stage}/{k}{suffix}": v for k, v in zip(names, means)}
        bar = {"val/loss_bar": means[3]} if stage == "val" else None
        self._hand_over(row, bar, write=False)
        self._rows[stage] = row

    def _write(self, stage: str) -> None:
        """The epoch's row of ``stage`` (its means and the values added to it) to the loggers.

        Under ``trainer.validate()`` through ``self.log`` (once: a dozen values), whose results
        are what ``validate()`` returns and prints."""
        row = {**self._rows.pop(stage, {}), **self._extra.pop(stage, {})}
        trainer = self._trainer
        if trainer is not None and row and trainer.state.fn == TrainerFn.VALIDATING:
            self.log_dict(row, on_step=False, on_epoch=True, batch_size=1)
            return
        self._hand_over(row, epoch_end=stage == "train")

    def _logging_step(self) -> bool:
        """Whether Lightning's logger writes this training step's values."""
        trainer = self._trainer
        if trainer is None:
            return True
        if trainer.fit_loop._should_accumulate():  # Lightning writes only a stepping batch's
            return False
        connector = getattr(trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def _start(self, stage: str) -> None:
        self._sums.pop(stage, None)
        self._counts.pop(stage, None)
        self._rows.pop(stage, None)
        self._extra.pop(stage, None)

    def on_train_epoch_start(self) -> None:
        self._start("train")

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        terms = self._losses(batch)
        weight = self.hparams["alpha"] if self.regularizer_on() else 0.0
        loss = terms["elbo_loss"] + weight * terms["reg"]
        n = batch["raw"].shape[0]
        values = self._term_values(terms, loss)
        self._accumulate("train", values, n)
        if self._logging_step():
            step = values.float()
            names = TERM_NAMES[: len(step)]
            row = {f"train/{k}_step": v for k, v in zip(names, step)}
            self._hand_over(row, {"train/loss_bar": step[3]})
        trainer = self._trainer
        if trainer is not None and batch_idx + 1 == trainer.num_training_batches:
            self._flush("train")
        return loss

    def on_train_epoch_end(self) -> None:
        self._flush("train")  # an epoch cut short (max_steps): its batches so far
        self._write("train")

    def on_validation_epoch_start(self) -> None:
        self._start("val")

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        terms = self._losses(batch)
        # the distance term always counts, so val/loss compares across the warm-up's end
        loss = terms["elbo_loss"] + self.hparams["alpha"] * terms["reg"]
        self._accumulate("val", self._term_values(terms, loss), batch["raw"].shape[0])

    def on_validation_epoch_end(self) -> None:
        self._flush("val")
        self._write("val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = list(self.parameters())
        impl = self.hparams["optimizer"]
        # on one CPU core a 2000-gene step's update: fused 0.4 ms, foreach 2.1 ms, loop 3.6 ms
        fused = impl == "fused" and all(
            p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params
        )
        return torch.optim.AdamW(
            params,
            lr=self.hparams["lr"],
            weight_decay=self.hparams["weight_decay"],
            foreach=None if fused else impl != "loop",
            fused=True if fused else None,
        )

    # ------------------------------------------------------------ prediction
    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls, checkpoint_path: Any, *args: Any, **kwargs: Any
    ) -> DPVAE:
        """Lightning's loader, remembering the file so that the run's reference is found beside it
        (:func:`dpvae.placement.resolve_reference`); checkpoints hold plain data only, so they are
        loaded with ``weights_only=True`` unless told otherwise."""
        from pathlib import Path

        kwargs.setdefault("weights_only", True)
        model = super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        if isinstance(checkpoint_path, str | Path):
            model.checkpoint_path = str(Path(checkpoint_path).expanduser().resolve())
        return model  # type: ignore[return-value]
