"""What a checkpoint needs beyond the weights for a resume to be exact, and a record of the run."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch


def _rng_state() -> dict[str, Any]:
    np_state: Any = np.random.get_state()  # noqa: NPY002 - the legacy global generator is the state
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [
            str(np_state[0]),
            torch.as_tensor(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "python": [int(py_version), torch.as_tensor(py_state, dtype=torch.int64), py_gauss],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))  # noqa: NPY002
    version, py_state, py_gauss = state["python"]
    random.setstate((version, tuple(int(v) for v in py_state.tolist()), py_gauss))


class RunState(L.Callback):
    """Saves the random generators' states and the run's record in every checkpoint.

    A checkpoint is written at the end of a training epoch, when every random number of that epoch
    has been drawn; the states saved then are restored at the start of the first epoch after a
    resume, after Lightning's sanity check and before the epoch's data loader draws its seed, so a
    resumed run continues the exact random sequence of an uninterrupted one (the batch sampler's
    order depends on the seed and the epoch only). Drawing nothing itself, it leaves an
    uninterrupted run unchanged.

    The record (:meth:`set_record`: the configuration and a fingerprint of the reference data)
    lets a later command refuse to resume a run whose model or data it would not match.
    """

    validation_every = 0  # reads no validation (ValidationSchedule)

    def __init__(self) -> None:
        super().__init__()
        self.record: dict[str, Any] = {}
        self._pending: dict[str, Any] | None = None

    def set_record(self, config: dict[str, Any], fingerprint: str) -> None:
        """The run's resolved configuration and its data fingerprint, kept in each checkpoint."""
        self.record = {"config": config, "fingerprint": fingerprint}

    def state_dict(self) -> dict[str, Any]:
        return {"rng": _rng_state(), "record": self.record}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("rng")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is None:
            return
        _set_rng_state(self._pending)
        self._pending = None
        if getattr(trainer.fit_loop, "is_resuming", False):
            # An uninterrupted run creates each epoch's training-data iterator after this hook,
            # and creating it draws one number from torch's global generator (the data loader's
            # base seed). In the first resumed epoch Lightning reuses the iterator it made before
            # this hook, so draw that number here; tests/test_resume.py checks the result.
            torch.empty((), dtype=torch.int64).random_()
