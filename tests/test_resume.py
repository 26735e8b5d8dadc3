"""Exact resume: a training killed with SIGKILL and started again ends where an uninterrupted one
does (same weights, same embedding.h5ad), with one CSV log."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _command(data: Path, run_dir: Path) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "train.py"),
        f"data.reference={data}",
        f"run_dir={run_dir}",
        "logger=csv",
        "trainer.max_epochs=8",
        "model.warmup_epochs=2",
        "callbacks.spatial.every_n_epochs=1",
        "callbacks.checkpoint.every_n_seconds=0",  # every epoch: the kill lands between two
        "trainer.enable_progress_bar=false",
    ]


def _epoch(ckpt: Path) -> int:
    try:
        return int(torch.load(ckpt, map_location="cpu", weights_only=True)["epoch"])
    except Exception:  # not there yet, or being written
        return -1


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_sigkill_then_rerun_ends_like_an_uninterrupted_run(
    osmfish_small: Path, tmp_path: Path
) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_command(osmfish_small, whole), check=True, env=env, capture_output=True)

    proc = subprocess.Popen(_command(osmfish_small, killed), env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _epoch(killed / "model.ckpt") < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stopped_at = _epoch(killed / "model.ckpt")
    assert 3 <= stopped_at < 7 and not (killed / "embedding.h5ad").exists()

    rerun = subprocess.run(_command(osmfish_small, killed), env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from" in rerun.stderr

    a, b = _weights(whole / "model.ckpt"), _weights(killed / "model.ckpt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    emb_a, emb_b = ad.read_h5ad(whole / "embedding.h5ad"), ad.read_h5ad(killed / "embedding.h5ad")
    np.testing.assert_array_equal(emb_a.X, emb_b.X)
    assert sorted(p.name for p in (killed / "csv").iterdir()) == ["version_0"]  # one log ...
    logs = {}
    for name, folder in (("whole", whole), ("killed", killed)):
        with open(folder / "csv" / "version_0" / "metrics.csv", newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("val/loss")]
        logs[name] = [(int(float(r["epoch"])), r["val/loss"]) for r in rows]
    assert logs["killed"] == logs["whole"]  # ... with every epoch once, as uninterrupted
    assert not (killed / ".lock").exists()


@pytest.mark.slow
def test_ctrl_c_says_how_to_resume_and_exits_130(osmfish_small: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        _command(osmfish_small, run_dir),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while _epoch(run_dir / "model.ckpt") < 1 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    lines = [line for line in err.strip().splitlines() if line.startswith("dpvae:")]
    assert lines[-1] == "dpvae: interrupted; run the same command again to resume"
    assert "Traceback" not in err and not (run_dir / ".lock").exists()


@pytest.mark.parametrize("workers", [0, 1])
def test_a_run_continued_with_loader_workers_trains_what_one_run_does(
    osmfish_small: Path, tmp_path: Path, workers: int
) -> None:
    """With loader workers (streaming, DDP, data.num_workers) the first epoch after a resume
    drew its batches before Lightning set the epoch: epoch 0's order and partners again. Two
    epochs, then two more in the same run folder, end with the weights of four in one go."""
    from dpvae.cli import train_main

    common = [
        f"data.reference={osmfish_small}",
        "logger=none",
        "model.warmup_epochs=1",
        f"data.num_workers={workers}",
        "callbacks.checkpoint.every_n_seconds=0",
        "trainer.enable_progress_bar=false",
    ]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert train_main([*common, f"run_dir={whole}", "trainer.max_epochs=4"]) == 0
    assert train_main([*common, f"run_dir={split}", "trainer.max_epochs=2"]) == 0
    assert train_main([*common, f"run_dir={split}", "trainer.max_epochs=4"]) == 0
    a, b = _weights(whole / "model.ckpt"), _weights(split / "model.ckpt")
    assert _epoch(split / "model.ckpt") == _epoch(whole / "model.ckpt") == 3
    for key in a:
        assert torch.equal(a[key], b[key]), key
