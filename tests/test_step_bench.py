"""``benchmarks.step``: its core functions on the embedded osmFISH with a few steps (no profile)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

from torch import nn

from benchmarks import step


def test_linear_flops_of_a_tiny_model_by_hand() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    flops = step.linear_flops(model)
    assert [layer["name"] for layer in flops["layers"]] == ["0", "2"]
    assert flops["forward_flop_per_row"] == 2 * 4 * 3 + 2 * 3 * 2 == 36
    assert flops["train_flop_per_row"] == 3 * 36
    # not a DPVAE: no layer is known to be fed by data, every input gradient counts
    assert flops["autograd_train_flop_per_row"] == 3 * 36


def test_loops_and_floor_on_osmfish(tmp_path: Path) -> None:
    cfg = step.train_config("osmfish", tmp_path / "run", "csv", 1)
    data, model = step.build(cfg)
    batches = step.materialise(data, 6)
    assert len(batches) == 6
    rows = step.rows_of(batches[0])
    assert rows == 256

    # the default model's Linear layers by hand: genes -> 128 -> (mu, logvar) 16; 16 -> 128 -> genes
    g = len(data.preprocessor.genes)
    forward = 2 * (g * 128 + 2 * 128 * 16 + 16 * 128 + 128 * g)
    flops = step.linear_flops(model)
    assert flops["forward_flop_per_row"] == forward
    assert flops["train_flop_per_row"] == 3 * forward
    fed = [layer["name"] for layer in flops["layers"] if not layer["input_needs_grad"]]
    assert fed == ["encoder.body.0"]  # the data-fed layer: no input gradient
    assert flops["autograd_train_flop_per_row"] == 3 * forward - 2 * g * 128

    bare = step.bare_loop(copy.deepcopy(model), batches, warmup=3)
    assert bare["steps"] == 3
    assert bare["s_per_step"] > 0 and bare["cells_per_s"] > 0
    assert math.isfinite(bare["final_loss"])

    light = step.lightning_loop(copy.deepcopy(model), batches, 3, cfg)
    assert light["global_step"] == 6
    assert light["steps"] == 2  # full cycles after the warm-up: start to the next start
    assert light["s_per_step"] > 0 and light["cells_per_s"] > 0
    assert 0 < light["in_hooks_s_per_step"] <= light["s_per_step"]
    ratio = light["s_per_step"] / bare["s_per_step"]
    assert math.isfinite(ratio) and ratio > 0

    floor = step.floor(flops, rows, gemm_seconds=0.01)
    assert floor["flop_per_cell"] == 3 * forward
    assert floor["floor_cells_per_s"] > 0 and floor["square_gflops"] > 0
    assert floor["step_gemms"]["flop_per_step"] == rows * flops["autograd_train_flop_per_row"]


def test_command_help_and_bad_keys() -> None:
    assert step.main(["--help"]) == 0
    assert step.main(["batches=1"]) == 2  # too few to time
    assert step.main(["no_such_key=1"]) == 2
