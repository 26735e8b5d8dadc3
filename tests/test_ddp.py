"""Multi-process (DDP) training: the validation callback's metrics equal a single process's."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METRICS = [
    "val/dist_pearson",
    "val/dist_spearman",
    "val/knn10",
    "val/median_error",
    "val/distortion_max_min",
    "val/distortion_p95_p5",
    "val/stress",
]


def _run(run_dir: Path, data: Path, extra: list[str]) -> dict[str, float]:
    # weights frozen (lr 0, no batch norm, regularizer never switched on) so that both runs
    # validate the same model; only the sharding of the validation cells differs
    args = [
        f"data.reference={data}",
        f"run_dir={run_dir}",
        "logger=csv",
        "trainer.max_epochs=1",
        "trainer.accelerator=cpu",
        "model.lr=0",
        "model.warmup_epochs=1000",
        "model.encoder.norm=none",
        "model.decoder.norm=none",
        "model.encoder.dropout=0",
        "callbacks.spatial.every_n_epochs=1",
        "trainer.enable_progress_bar=false",
        "data.val_fraction=0.25",
        *extra,
    ]
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=run_dir.parent,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(run_dir / "csv" / "version_0" / "metrics.csv")))
    out = {}
    for row in rows:
        for key in METRICS:
            if row.get(key):
                out[key] = float(row[key])
    assert set(out) == set(METRICS), out
    return out


@pytest.mark.slow
def test_ddp_two_processes_log_the_single_process_metrics(
    osmfish_small: Path, tmp_path: Path
) -> None:
    single = _run(tmp_path / "single", osmfish_small, ["trainer.devices=1"])
    ddp = _run(tmp_path / "ddp", osmfish_small, ["trainer.devices=2", "trainer.strategy=ddp"])
    for key in METRICS:
        assert ddp[key] == pytest.approx(single[key], rel=1e-5, abs=1e-6), key
    assert single["val/dist_pearson"] > -1.0  # a real number was computed
