"""ValidationSchedule: the validation passes nothing reads are skipped, and the trained model is the
one of validating every epoch (the same weights, bit for bit, and the same stopping epoch)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch

from dpvae.callbacks import ValidationSchedule


class _Counter(L.Callback):
    """Counts the validation passes of training (not the sanity check's); reads none itself."""

    validation_every = 0

    def __init__(self) -> None:
        self.epochs: list[int] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.epochs.append(trainer.current_epoch)


def _train(path: Path, *extra: str) -> tuple[dict[str, torch.Tensor], int, list[int]]:
    from dpvae import pipeline
    from dpvae.config import load_config

    cfg = load_config(
        [
            f"data.reference={path}",
            "seed=0",
            "logger=none",
            "trainer.max_epochs=15",
            "model.warmup_epochs=5",
            "callbacks.early_stopping.patience=1",
            *extra,
        ]
    )
    counter = _Counter()
    trained = pipeline.train(cfg, extra_callbacks=[counter])  # in memory: no logger, no files
    state = {k: v.detach().clone() for k, v in trained.model.state_dict().items()}
    return state, int(trained.trainer.current_epoch), counter.epochs


def test_skipped_validations_leave_the_model_unchanged(osmfish_small: Path) -> None:
    scheduled, stopped, passes = _train(osmfish_small)
    every, stopped_every, passes_every = _train(osmfish_small, "callbacks.validation=null")
    # only the epochs the stopping rule and the spatial scores read (every 5th) were validated
    assert passes == [e for e in passes_every if (e + 1) % 5 == 0]
    assert len(passes) < len(passes_every)
    assert stopped == stopped_every
    assert scheduled.keys() == every.keys()
    assert all(torch.equal(scheduled[k], every[k]) for k in every), "the weights differ"


def test_a_validation_schedule_the_user_set_is_kept(osmfish_small: Path) -> None:
    from dpvae import pipeline
    from dpvae.config import load_config

    cfg = load_config(
        [
            f"data.reference={osmfish_small}",
            "logger=none",
            "trainer.max_epochs=6",
            "model.warmup_epochs=2",
            "trainer.check_val_every_n_epoch=3",
        ]
    )
    counter = _Counter()
    trained = pipeline.train(cfg, extra_callbacks=[counter])
    assert counter.epochs == [2, 5]
    assert trained.trainer.check_val_every_n_epoch == 3


def test_the_default_profiler_pickles_and_barebones_has_none() -> None:
    """Spawned DDP pickles the trainer; Lightning's barebones mode refuses any profiler."""
    import pickle

    from lightning.pytorch.profilers import PassThroughProfiler

    from dpvae import pipeline
    from dpvae.config import load_config
    from dpvae.profiler import NoProfiler

    trainer = pipeline.build_trainer(load_config([]), [])
    assert isinstance(trainer.profiler, NoProfiler)
    assert isinstance(pickle.loads(pickle.dumps(trainer.profiler)), NoProfiler)
    bare = pipeline.build_trainer(
        load_config(["+trainer.barebones=true", "trainer.log_every_n_steps=null"]), []
    )
    assert type(bare.profiler) is PassThroughProfiler


def _trainer(**kw: Any) -> Any:
    readers = kw.pop("readers", (5, 5, 0, 0))
    base = {
        "loggers": [],
        "check_val_every_n_epoch": 1,
        "val_check_interval": 1.0,
        "max_steps": -1,
        "max_epochs": 60,
        "callbacks": [SimpleNamespace(validation_every=r) for r in readers],
    }
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize(
    ("settings", "every"),
    [
        ({}, 5),  # the stopping rule and the spatial scores, every 5th epoch
        ({"readers": (10, 5, 0)}, 5),
        ({"readers": (5, 3)}, 1),  # their greatest common divisor
        ({"readers": (0, 0)}, 60),  # nothing reads validation: the last epoch only
        ({"loggers": ["csv"]}, 1),  # curves: every epoch
        ({"max_epochs": 62}, 1),  # the last epoch would not be validated
        ({"max_steps": 100}, 1),
        ({"check_val_every_n_epoch": 2}, 1),  # a schedule the user set is kept
        ({"val_check_interval": 0.5}, 1),
    ],
)
def test_the_period_is_what_readers_need(settings: dict[str, Any], every: int) -> None:
    assert ValidationSchedule.period(_trainer(**settings)) == every


def test_a_callback_that_does_not_say_reads_every_validation() -> None:
    trainer = _trainer(callbacks=[SimpleNamespace(validation_every=5), L.Callback()])
    assert ValidationSchedule.period(trainer) == 1
