"""The stopping rule: checked on the epochs the placement score exists, after the warm-up, and
replayed exactly from one fixed-schedule trace (the dev benchmark's choice of the default)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from benchmarks.stopping import Rule, replay, trace_unit
from tests.conftest import run_train

FAST = ["logger=none", "trainer.enable_progress_bar=false", "callbacks.report.every_epoch=false"]


def test_rule_counts_validations_after_the_warmup() -> None:
    rule = Rule("val_dist_pearson", "max", patience=2, min_delta=0.01, warmup=10)
    epochs = [5, 10, 15, 20, 25, 30, 35]
    # the warm-up's scores (epochs 5, 10) never count; 0.505 is within min_delta of 0.5
    assert rule.stop([0.9, 0.9, 0.5, 0.505, 0.51, 0.7, 0.7], epochs) == (4, 4)
    # an improvement resets the wait; none by the end: the fixed schedule
    assert rule.stop([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], epochs) == (6, 6)
    best = Rule("val_dist_pearson", "max", patience=2, warmup=10, best=True)
    assert best.stop([0.1, 0.2, 0.6, 0.5, 0.4, 0.9, 0.9], epochs) == (4, 2)
    late = Rule("val_dist_pearson", "max", patience=1, warmup=10, min_epochs=30)
    assert late.stop([0.1, 0.2, 0.6, 0.5, 0.4, 0.3, 0.2], epochs) == (5, 5)
    # as in Lightning, a stop once decided holds until min_epochs, whatever comes after it
    assert late.stop([0.1, 0.2, 0.6, 0.5, 0.7, 0.8, 0.9], epochs) == (5, 5)
    # a non-finite score stops at once
    assert rule.stop([0.1, 0.2, 0.6, float("nan"), 0.7, 0.8, 0.9], epochs) == (3, 3)
    # a loss (mode min) improves by falling
    loss = Rule("val_loss", "min", patience=2, warmup=10)
    assert loss.stop([9.0, 9.0, 5.0, 4.0, 4.5, 4.2, 3.0], epochs) == (5, 5)


def test_replay_keeps_the_fixed_schedule_without_a_stop() -> None:
    import pandas as pd

    trace = pd.DataFrame(
        {
            "task": "impute",
            "unit": "u",
            "seed": [0, 0, 0, 1, 1, 1],
            "epoch": [15, 20, 25, 15, 20, 25],
            "seconds": [1.0, 2.0, 4.0, 1.0, 2.0, 4.0],
            "dist_pearson": [0.5, 0.6, 0.7, 0.4, 0.3, 0.2],
            "val_dist_pearson": [0.5, 0.6, 0.7, 0.4, 0.3, 0.2],
        }
    )
    row = replay(trace, [Rule("val_dist_pearson", "max", patience=1, warmup=10)]).iloc[0]
    # seed 0 improves to the end (0.7, all of the time); seed 1 stops at epoch 20 (0.3, half)
    assert row.fixed == pytest.approx(0.45) and row.stopped == pytest.approx(0.5)
    assert row.epochs == pytest.approx(22.5) and row.time_share == pytest.approx(0.75)


@pytest.fixture(scope="module")
def split(osmfish_small: Path) -> tuple[ad.AnnData, ad.AnnData, np.ndarray]:
    from benchmarks.protocol import hygiene, impute_split, method_inputs

    full = hygiene(ad.read_h5ad(osmfish_small))
    ri, qi = impute_split(full.n_obs, 0)
    ref_in, query_in = method_inputs(full[ri], full[qi])
    return ref_in, query_in, np.asarray(full[qi].obsm["spatial"], dtype=np.float64)


SCHEDULE = [
    "trainer.max_epochs=12",
    "model.warmup_epochs=2",
    "callbacks.spatial.every_n_epochs=2",
    "callbacks.early_stopping.monitor=val/dist_pearson",
    "callbacks.early_stopping.mode=max",
    "callbacks.early_stopping.every_n_epochs=1",
    "callbacks.early_stopping.patience=1",
    "callbacks.early_stopping.min_delta=0.05",
]


def test_a_stopped_run_is_the_trace_at_its_epoch(
    split: tuple[ad.AnnData, ad.AnnData, np.ndarray],
) -> None:
    """The replay's premise: a run the rule stops after epoch e places cells as the fixed
    schedule's weights of epoch e do (the rule draws no random number)."""
    import dpvae
    from benchmarks.protocol import _score

    ref_in, query_in, T = split
    rows = trace_unit(ref_in, query_in, "impute", 0, T, ref_in.obsm["spatial"], SCHEDULE)
    epochs = [r["epoch"] for r in rows]
    assert epochs == [2, 4, 6, 8, 10, 12]
    rule = Rule("val_dist_pearson", "max", patience=1, min_delta=0.05, warmup=2, every=2)
    stop_i, keep_i = rule.stop([r["val_dist_pearson"] for r in rows], epochs)
    assert stop_i < len(rows) - 1  # it stops before the fixed schedule's end
    model = dpvae.fit(ref_in, "seed=0", *SCHEDULE)
    P = model.predict(query_in)
    got = _score("dpvae", "impute", P, T, ref_in.obsm["spatial"])["dist_pearson"]
    assert got == pytest.approx(rows[keep_i]["dist_pearson"], abs=1e-9)
    assert got != pytest.approx(rows[-1]["dist_pearson"], abs=1e-6)


def _stopped(reference: Path, run_dir: Path, *args: str) -> tuple[int, dict]:
    """Train on ``reference`` (40 epochs at most, 2 of warm-up) with ``args``; return the last
    epoch trained (0-based) and the early-stopping callback's saved state."""
    run_train(
        [
            *FAST,
            f"data.reference={reference}",
            f"run_dir={run_dir}",
            "trainer.max_epochs=40",
            "model.warmup_epochs=2",
            *args,
        ]
    )
    ckpt = torch.load(run_dir / "model.ckpt", weights_only=True, map_location="cpu")
    state = next(v for k, v in ckpt["callbacks"].items() if "EarlyStopping" in k)
    return int(ckpt["epoch"]), state


STOP_AT_ONCE = (
    "callbacks.spatial.every_n_epochs=100",
    "callbacks.early_stopping.patience=1",
    "callbacks.early_stopping.min_delta=1000",  # no check improves by that: stop at once
)


def test_the_default_rule_checks_every_fifth_epoch_after_the_warmup(
    osmfish_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    epoch, state = _stopped(osmfish_small, tmp_path / "run", *STOP_AT_ONCE)
    # val/loss checks at epochs 5, 10, ...: the first sets the best, the second stops the run
    assert epoch == 9 and state["stopped_epoch"] == 9 and state["wait_count"] == 1
    err = capsys.readouterr().err
    assert "stopped early after epoch 10 of 40: val/loss no better for 1 checks (5 epochs)" in err
    # the same command again: a finished run, ended by the rule, not resumed
    again = _stopped(osmfish_small, tmp_path / "run", *STOP_AT_ONCE)
    assert again == (epoch, state)
    assert "finished run (10 epochs); nothing to do (the stopping rule ended it" in (
        capsys.readouterr().err
    )

    # interrupted before its embedding was written: resuming writes it and trains no further
    def steps() -> int:
        ckpt = torch.load(tmp_path / "run" / "model.ckpt", weights_only=True, map_location="cpu")
        return int(ckpt["global_step"])

    before = steps()
    (tmp_path / "run" / "embedding.h5ad").unlink()
    _, state_after = _stopped(osmfish_small, tmp_path / "run", *STOP_AT_ONCE)
    assert steps() == before and state_after["stopped_epoch"] == 9
    assert (tmp_path / "run" / "embedding.h5ad").exists()
    assert "stopped early after epoch 10 of 40" in capsys.readouterr().err


def test_a_spatial_monitor_is_checked_where_cells_were_placed(
    osmfish_small: Path, tmp_path: Path
) -> None:
    epoch, state = _stopped(
        osmfish_small,
        tmp_path / "run",
        "callbacks.spatial.every_n_epochs=3",
        "callbacks.early_stopping.monitor=val/dist_pearson",
        "callbacks.early_stopping.mode=max",
        "callbacks.early_stopping.every_n_epochs=1",
        "callbacks.early_stopping.patience=1",
        "callbacks.early_stopping.min_delta=0.5",  # no placement improves by 0.5
    )
    # placements at epochs 3, 6, ...: the first after the warm-up (3) sets the best, the next (6)
    # has not improved by 0.5, so the run ends after epoch 6, not on an epoch between them
    assert epoch == 5 and state["stopped_epoch"] == 5 and state["wait_count"] == 1


def test_no_validation_cells_keep_the_fixed_schedule(
    osmfish_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    epoch, state = _stopped(osmfish_small, tmp_path / "run", "data.val_fraction=0")
    assert epoch == 39 and state["stopped_epoch"] == 0
    assert "early stopping on val/loss is off (no validation cells)" in capsys.readouterr().err
