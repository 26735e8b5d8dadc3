"""Multi-process (DDP) training: the validation callback's metrics equal a single process's, and
two processes that really train keep one model."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from tests.conftest import train_process

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
    train_process(args, cwd=run_dir.parent, env=env)
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


PROBE_MODULE = '''
import hashlib
import json
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback


def _digest(tensors):
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class RankProbe(Callback):
    """Writes what one rank saw and ended with to OUT/rank{global_rank}.json."""

    def __init__(self, out):
        self.out = out
        self.lambda_at_switch_on = None
        self.switch_on_epoch = None
        self.losses = {}
        self.anchors = {}
        self.pair_sets = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        epoch = str(trainer.current_epoch)
        self.anchors.setdefault(epoch, []).extend(batch["index"][0::2].tolist())
        self.pair_sets += int("pairs" in batch and "pair_weight" in batch)

    def on_before_backward(self, trainer, pl_module, loss):
        # right after the forward pass that switched the regularizer on (no optimizer step yet)
        if self.lambda_at_switch_on is None and bool(pl_module.scale_initialised):
            self.lambda_at_switch_on = float(pl_module.regularizer.scale())
            self.switch_on_epoch = trainer.current_epoch
        self.losses.setdefault(str(trainer.current_epoch), []).append(float(loss))

    def on_train_end(self, trainer, pl_module):
        params = sorted(pl_module.named_parameters())
        buffers = sorted(pl_module.named_buffers())
        out = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "lambda_at_switch_on": self.lambda_at_switch_on,
            "switch_on_epoch": self.switch_on_epoch,
            "final_lambda": float(pl_module.regularizer.scale()),
            "losses": self.losses,
            "anchors": self.anchors,
            "pair_sets": self.pair_sets,
            "params": _digest(params),
            "n_params": len(params),
            "running_stats": any("running_mean" in n for n, _ in buffers),
            "buffers": _digest(buffers),
        }
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(out))
'''


@pytest.mark.slow
def test_ddp_two_processes_train_one_model(osmfish_small: Path, tmp_path: Path) -> None:
    """Two gloo processes that really train (lr > 0, batch norm, dropout, the regularizer switching
    on after one warm-up epoch, weighted pair sets): identical weights on both ranks at the end, one
    lambda on both right after the switch-on, a falling loss, disjoint anchors per epoch."""
    (tmp_path / "rank_probe.py").write_text(PROBE_MODULE)
    probe = tmp_path / "probe"
    probe.mkdir()
    run_dir = tmp_path / "run"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    args = [
        f"data.reference={osmfish_small}",
        f"run_dir={run_dir}",
        "logger=none",
        "trainer.max_epochs=3",
        "model.warmup_epochs=1",
        "model.lr=3e-3",
        "data.batch_size=64",
        "data.pair_set=true",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "callbacks.spatial.every_n_epochs=100",
        "embedding.write=false",
        "trainer.enable_progress_bar=false",
        f"+callbacks.probe={{_target_: rank_probe.RankProbe, out: '{probe}'}}",
    ]
    train_process(args, cwd=tmp_path, env=env, timeout=300)
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    a, b = ranks
    # one model: every parameter bit-identical on both ranks after 3 epochs of training
    assert a["n_params"] > 10 and a["running_stats"]  # batch norm on
    assert a["params"] == b["params"]
    assert a["buffers"] == b["buffers"]  # batch-norm running statistics too (rank 0's, broadcast)
    # lambda: re-initialised at the start of epoch 1 from the mean of the ranks' batch medians,
    # the same on both (each rank's own median would differ: different batches), then learned
    assert a["switch_on_epoch"] == b["switch_on_epoch"] == 1
    assert a["lambda_at_switch_on"] == b["lambda_at_switch_on"]
    assert a["lambda_at_switch_on"] != pytest.approx(1.0)  # the reset happened
    assert a["final_lambda"] == b["final_lambda"] != a["lambda_at_switch_on"]
    for r in ranks:
        mean = {int(e): sum(v) / len(v) for e, v in r["losses"].items()}
        assert sorted(mean) == [0, 1, 2]
        assert mean[2] < mean[1], mean  # training lowers the loss once the regularizer is on
        first, last = r["losses"]["0"][:3], r["losses"]["0"][-3:]
        assert sum(last) < sum(first), r["losses"]["0"]  # and during the warm-up
        assert r["pair_sets"] == sum(len(v) for v in r["losses"].values())  # every batch had one
    # each epoch the ranks' anchors are disjoint halves of the training cells, none repeated
    for epoch in ("0", "1", "2"):
        left, right = a["anchors"][epoch], b["anchors"][epoch]
        assert len(left) == len(set(left)) == len(right) == len(set(right))
        assert not set(left) & set(right)
    assert a["anchors"]["0"] != a["anchors"]["1"]  # a new order every epoch
