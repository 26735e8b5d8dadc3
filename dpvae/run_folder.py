"""A training run's folder: what resumes, what is refused, and who may write it.

- :func:`checkpoint_to_resume`: the latest of ``last.ckpt`` and ``model.ckpt`` of an earlier run,
  read once (:class:`Resume`);
- :func:`check_resume`: a resume whose model or data differ from the run's record stops with one line
  naming the difference, before anything is written (the record is kept in every checkpoint by
  :class:`dpvae.callbacks.RunState`);
- :class:`RunLock`: one training per folder at a time (a lock file with the pid; a lock left by a
  process that no longer runs is taken over).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpvae.errors import ConfigError
from dpvae.paths import CHECKPOINT_FILE as CHECKPOINT_FILE  # the model to use

LOCK_FILE = ".lock"
#: the files of a run folder (the embedding's name is :data:`dpvae.placement.EMBEDDING_FILE`)
LAST_FILE = "last.ckpt"  # the latest epoch, with a monitor
CONFIG_FILE = "config.yaml"
FIGURE_FILE = "training.png"  # callbacks.report draws it
#: a fine-tuned run that places through its starting model's reference cells: a copy of them
THROUGH_FILE = "through.h5ad"


@dataclass(frozen=True)
class Resume:
    """What a resume needs from the checkpoint it continues, read from the file once.

    Attributes:
        path: the checkpoint.
        epoch: the epoch it was written at.
        record: the run record :class:`dpvae.callbacks.RunState` keeps (empty without one).
        stopped_early: the run ended by early stopping (it is finished).
    """

    path: Path
    epoch: int
    record: dict[str, Any]
    stopped_early: bool


def read_checkpoint(checkpoint: Path) -> Resume:
    """One read of a checkpoint: its epoch, run record and early-stopping state.

    Raises:
        ConfigError: the file is not a readable checkpoint, or holds no training state.
    """
    import torch

    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, foreign or unsafe: one line, never torch's advice
        raise ConfigError(
            f"{checkpoint} cannot be read as a dpvae checkpoint ({type(exc).__name__}); move it "
            "away or choose another run_dir"
        ) from None
    if not isinstance(ckpt, dict) or "loops" not in ckpt or "optimizer_states" not in ckpt:
        raise ConfigError(
            f"{checkpoint} holds a trained model without its training state (dpvae.Model.save); "
            "it predicts but cannot be resumed: choose another run_dir"
        )
    states = {str(k): v for k, v in ckpt.get("callbacks", {}).items() if isinstance(v, dict)}
    record = next((dict(v.get("record") or {}) for k, v in states.items() if "RunState" in k), {})
    stopped = any(
        "EarlyStopping" in k and int(v.get("stopped_epoch", 0) or 0) > 0 for k, v in states.items()
    )
    return Resume(checkpoint, int(ckpt.get("epoch", -1)), record, stopped)


def checkpoint_to_resume(run_dir: Path, resume: bool) -> Resume | None:
    """The checkpoint an interrupted run continues from (the latest of ``last.ckpt`` and
    ``model.ckpt``), or ``None`` for a new run.

    Raises:
        ConfigError: the folder holds a run and ``resume`` is false, or its checkpoint cannot be
            resumed (see :func:`read_checkpoint`).
    """
    existing = [p for p in (run_dir / LAST_FILE, run_dir / CHECKPOINT_FILE) if p.exists()]
    if not existing:
        return None
    read: list[Resume | ConfigError] = []
    for path in existing:
        try:
            read.append(read_checkpoint(path))
        except ConfigError as exc:
            read.append(exc)
    epochs = [r.epoch if isinstance(r, Resume) else -1 for r in read]
    order = sorted(range(len(existing)), key=epochs.__getitem__, reverse=True)  # the latest
    if not resume:
        raise ConfigError(
            f"{run_dir} already holds {existing[order[0]].name}; choose another run_dir, or "
            "resume=true to continue that run"
        )
    chosen = read[order[0]]
    if isinstance(chosen, ConfigError):
        raise chosen
    return chosen


def fingerprint(data: Any) -> str:
    """A hash of the reference a run trains on: its cells, positions and fitted preprocessing."""
    cells = data.cells("all")
    h = hashlib.sha1()
    h.update(json.dumps(data.preprocessor.to_dict(), sort_keys=True, default=str).encode())
    h.update(np.ascontiguousarray(cells.coords, dtype=np.float64).tobytes())
    # the names NUL-joined, hashed a block at a time (the digest of the whole joined string): a
    # million names at once would leave ~100 MB of freed Python strings held by the allocator
    block = 65_536
    for start in range(0, len(cells.names), block):
        if start:
            h.update(b"\0")
        h.update("\0".join(map(str, cells.names[start : start + block])).encode())
    return h.hexdigest()


def _first_difference(old: Any, new: Any, path: str) -> tuple[str, Any, Any] | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            found = _first_difference(old.get(key), new.get(key), f"{path}.{key}")
            if found:
                return found
        return None
    return None if old == new else (path, old, new)


def check_resume(record: dict[str, Any], config: dict[str, Any], run_dir: Path) -> None:
    """Refuse to resume when the command's model differs from the run's (before any write).

    Raises:
        ConfigError: naming the first differing key, its two values and the fix.
    """
    if not record:
        return
    found = _first_difference(record.get("config", {}).get("model"), config.get("model"), "model")
    if found:
        key, was, now = found
        raise ConfigError(
            f"cannot resume {run_dir}: {key} is {was!r} in that run but {now!r} in this command; "
            f"use the run's value or another run_dir"
        )


def check_data(
    record: dict[str, Any], data_fingerprint: str, run_dir: Path, config: dict[str, Any]
) -> None:
    """Refuse to resume on other reference data than the run's (its :func:`fingerprint`
    differs; before any write)."""
    if record.get("fingerprint") and record["fingerprint"] != data_fingerprint:
        was = record.get("config", {}).get("data", {}).get("reference")
        now = config.get("data", {}).get("reference")
        where = f" (data.reference {was!r} then, {now!r} now)" if was != now else ""
        raise ConfigError(
            f"cannot resume {run_dir}: the reference data differ from that run's{where}; "
            "give the run's data or another run_dir"
        )


def trim_csv_logs(run_dir: Path, last_epoch: int) -> None:
    """Drop the rows of epochs after ``last_epoch`` from every ``metrics.csv`` of the run: a resume
    replays them, and its own rows are appended."""
    import csv

    for path in run_dir.rglob("metrics.csv"):
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            rows = [r for r in reader if not r.get("epoch") or float(r["epoch"]) <= last_epoch]
        import io

        from dpvae.io import write_text_atomic

        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(path, buffer.getvalue())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``run_dir/.lock`` holding this process's pid while it trains.

    Raises (on :meth:`acquire`):
        ConfigError: another live process holds the folder.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self.held = False

    def holder(self) -> int | None:
        """The pid of a live process holding the lock, if any."""
        try:
            pid = int(self.path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if pid != os.getpid() and _alive(pid) else None

    def check(self) -> None:
        """Raise if the folder is busy (reads only)."""
        pid = self.holder()
        if pid is not None:
            raise ConfigError(
                f"{self.path.parent} is in use by training process {pid}; wait for it to finish, "
                "stop it, or choose another run_dir"
            )

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
                break
            except FileExistsError:
                self.check()  # a live holder: refuse
                self.path.unlink(missing_ok=True)  # stale: its process is gone; take it over
        else:
            raise ConfigError(f"{self.path.parent} is in use by another training")
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{os.getpid()}\n")
        self.held = True

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
