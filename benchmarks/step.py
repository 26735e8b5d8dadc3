"""Seconds per training step of dpvae's default model: a bare PyTorch loop, Lightning, the FLOP floor.

Run from the repository root of a checkout (keys and defaults in ``benchmarks/conf/step.yaml``,
``--help`` prints them)::

    python -m benchmarks.step                                  # osmFISH and 100k x 2000 synthetic
    python -m benchmarks.step datasets=[osmfish] batches=100 repeats=1 profile_steps=0
    python -m benchmarks.step report=true                      # also docs/benchmarks/step.{md,json}

For every dataset (``osmfish``: the embedded osmFISH; ``synthetic``: a count reference of ``cells``
x ``n_genes`` made by :mod:`benchmarks.synthetic` under ``data_dir``, named as
:mod:`benchmarks.scale` names its files, so an existing one is reused; any other value: a
``data.reference``) the training configuration (``conf/train.yaml`` with ``model.warmup_epochs=0``,
so the distance regularizer is on from the first step, ``threads`` torch threads and
``train_args``) builds the datamodule and the model as training does
(:func:`dpvae.pipeline.build_datamodule`, :func:`dpvae.pipeline.build_model`). ``batches``
batches are drawn from its ``train_dataloader()`` once and kept, so data loading is no part of any
timing, and every loop starts from a copy of the same freshly built model. Measured:

- ``bare``: a plain loop, ``model.train()``, ``model._losses(batch)``, ``loss = elbo_loss + alpha *
  reg``, ``backward``, AdamW ``step`` (``model.configure_optimizers()``), ``zero_grad``; seconds per
  step over the batches after the first ``warmup``;
- ``lightning``: the same model class and batches through ``lightning.Trainer`` built by
  :func:`dpvae.pipeline.build_trainer` from the configuration (one epoch, ``log_every_n_steps`` as
  configured, the configured ``logger`` writing to a temporary run folder, no progress bar, no
  checkpoints, no validation); a callback stamps ``on_train_batch_start``, so a step is one full
  cycle of Lightning's loop (fetch, transfer, hooks, ``training_step`` with its ``self.log``
  calls, backward, optimizer, the logger connector), Trainer construction and setup excluded;
- ``floor``: multiply-adds of the model's ``nn.Linear`` layers (forward ``2 * in * out`` FLOP per
  row, training about 3x forward), this machine's single-thread ``torch.matmul`` rate on the
  model's own GEMM shapes (every Linear's forward, input-gradient and weight-gradient product at
  the batch's rows, replayed on random tensors) and on a square 1024^3 product; floor cells/s is
  the rate divided by FLOP per cell, and each loop is reported as a percentage of it;
- ``profile``: ``profile_steps`` bare steps under ``torch.profiler`` (CPU), the top ``top`` ops by
  self CPU time; and one more Lightning pass under ``cProfile`` (between the first timed step and
  the epoch's end) and Lightning's ``SimpleProfiler``: where a Lightning step's time goes.

The bare and Lightning loops alternate ``repeats`` times and the median is reported. Writes
``results.json`` and ``results.md`` to ``out``; ``report=true`` also copies them to
``docs/benchmarks/step.json`` and ``docs/benchmarks/step.md``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig

from dpvae.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks"
ROOT_FILE = "step.yaml"
CONF_DIR = Path(__file__).resolve().parent / "conf"
SUMMARY = """
Seconds per training step of dpvae's default model on materialised batches: a bare PyTorch loop
(losses, backward, AdamW), the same through lightning.Trainer, and the FLOP floor of its Linear
layers at this machine's single-thread matmul rate; with a torch.profiler op table of bare steps
and a cProfile of Lightning's loop. Writes results.json and results.md to out.
"""


# ------------------------------------------------------------------------------ building
def train_config(
    reference: str, run_dir: Path, logger: str = "csv", threads: int = 1, extra: Sequence[str] = ()
) -> DictConfig:
    """The training configuration the benchmark builds from (``conf/train.yaml`` composed)."""
    from dpvae.config import load_config

    return load_config(
        [
            f"data.reference={reference}",
            f"run_dir={run_dir}",
            f"logger={logger}",
            f"threads={threads}",
            "model.warmup_epochs=0",
            "trainer.max_epochs=1",
            "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false",
            "trainer.limit_val_batches=0",
            "+trainer.num_sanity_val_steps=0",
            *extra,
        ]
    )


def build(cfg: DictConfig) -> tuple[Any, Any]:
    """(datamodule, model) as training builds them (seeds and threads set first)."""
    from dpvae import pipeline

    pipeline.configure_process(cfg)
    data = pipeline.build_datamodule(cfg)
    model = pipeline.build_model(cfg, data)
    return data, model


def materialise(data: Any, n: int) -> list[dict[str, Any]]:
    """``n`` batches of ``data.train_dataloader()`` (further epochs when one has fewer)."""
    loader = data.train_dataloader()
    batches: list[dict[str, Any]] = []
    epoch = 0
    while len(batches) < n:
        set_epoch = getattr(loader.batch_sampler, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)
        before = len(batches)
        for batch in loader:
            batches.append(batch)
            if len(batches) >= n:
                break
        if len(batches) == before:
            raise ConfigError("the training dataloader yields no batches")
        epoch += 1
    return batches


def synthetic_reference(data_dir: Path, n: int, n_genes: int, density: float, seed: int) -> Path:
    """The synthetic reference of :mod:`benchmarks.scale`'s naming, written on first use."""
    from benchmarks import synthetic

    path = data_dir / f"synth_{n}x{n_genes}_d{density:g}_seed{seed}_ref.h5ad"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        tissue = synthetic.make_tissue(seed, n_genes, density)
        synthetic.write_section(path, tissue, n, seed, 0, False, own_frame=False)
        print(f"wrote {path} in {time.perf_counter() - start:.0f} s", flush=True)
    return path


def rows_of(batch: dict[str, Any]) -> int:
    """Cells (rows) of a batch."""
    return int(batch["raw"].shape[0])


# ------------------------------------------------------------------------------ the loops
def _usage() -> tuple[float, int]:
    """(system CPU seconds, minor page faults) of this process so far."""
    import resource

    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_stime, u.ru_minflt


def _timing(
    seconds: list[float], cpu: float, rows: int, usage: tuple[float, int]
) -> dict[str, Any]:
    per_step = sum(seconds) / len(seconds)
    return {
        "steps": len(seconds),
        "s_per_step": per_step,
        "median_s_per_step": statistics.median(seconds),
        "cpu_s_per_step": cpu / len(seconds),
        # the kernel's share: mostly page faults of large tensors malloc maps and unmaps
        "sys_s_per_step": usage[0] / len(seconds),
        "page_faults_per_step": usage[1] / len(seconds),
        "cells_per_s": rows / per_step,
    }


def bare_loop(
    model: Any,
    batches: Sequence[dict[str, Any]],
    warmup: int,
) -> dict[str, Any]:
    """Train ``model`` on ``batches`` in a plain loop; the steps after ``warmup``, timed."""
    model.train()
    alpha = float(model.hparams["alpha"]) if model.regularizer_on() else 0.0
    optimizer = model.configure_optimizers()
    seconds: list[float] = []
    cpu = 0.0
    usage = _usage()
    for i, batch in enumerate(batches):
        if i == warmup:
            usage = _usage()
        start, cpu_start = time.perf_counter(), time.process_time()
        terms = model._losses(batch)
        loss = terms["elbo_loss"] + alpha * terms["reg"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
            cpu += time.process_time() - cpu_start
    if not seconds:
        raise ConfigError(f"warmup={warmup} leaves no timed step of {len(batches)} batches")
    end = _usage()
    out = _timing(seconds, cpu, rows_of(batches[-1]), (end[0] - usage[0], end[1] - usage[1]))
    out["final_loss"] = float(loss.detach())
    return out


def _same(batch: Any) -> Any:
    return batch


def _step_timer(warmup: int, profile: Any = None) -> Any:
    import lightning as L

    class StepTimer(L.Callback):
        """Stamps every training batch's start and end; runs ``profile`` from step ``warmup``."""

        def __init__(self) -> None:
            self.starts: list[float] = []
            self.ends: list[float] = []
            self.cpu_starts: list[float] = []
            self.usage: list[tuple[float, int]] = []
            self.epoch_end = math.nan

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, i: int) -> None:
            if len(self.starts) == warmup and profile is not None:
                profile.enable()
            self.cpu_starts.append(time.process_time())
            self.usage.append(_usage())
            self.starts.append(time.perf_counter())

        def on_train_batch_end(
            self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, i: int
        ) -> None:
            self.ends.append(time.perf_counter())

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            self.epoch_end = time.perf_counter()
            if profile is not None:
                profile.disable()

    return StepTimer()


def lightning_loop(
    model: Any,
    batches: Sequence[dict[str, Any]],
    warmup: int,
    cfg: DictConfig,
    profile: Any = None,
    profiler: Any = None,
) -> dict[str, Any]:
    """Train ``model`` on ``batches`` for one epoch of ``lightning.Trainer``; steps after ``warmup``.

    A step is the interval between consecutive ``on_train_batch_start`` calls, so it holds all of
    Lightning's per-batch work; ``in_hooks_s_per_step`` is the part between a batch's start and
    end hooks (``training_step``, backward, optimizer), the rest is ``between_hooks``. ``profile``
    (a ``cProfile.Profile``) runs from the first timed step to the epoch's end; ``profiler`` is a
    Lightning profiler for the Trainer.
    """
    import warnings

    from torch.utils.data import DataLoader

    from dpvae import pipeline

    if warmup + 2 > len(batches):
        raise ConfigError(f"warmup={warmup} leaves under 2 timed Lightning steps of {len(batches)}")
    timer = _step_timer(warmup, profile)
    logger = pipeline.build_logger(cfg)
    run_dir = Path(str(cfg.run_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pipeline.build_trainer(cfg, [timer], logger, run_dir)
        if profiler is not None:
            trainer.profiler = profiler  # type: ignore[attr-defined]  # fit sets it up
        items = cast(Any, list(batches))
        loader: DataLoader[Any] = DataLoader(items, batch_size=None, collate_fn=_same)
        trainer.fit(model, train_dataloaders=loader)
    starts = timer.starts
    if len(starts) != len(batches):
        raise RuntimeError(f"Lightning ran {len(starts)} of {len(batches)} batches")
    steps = len(starts) - 1 - warmup  # full cycles: batch start to the next batch's start
    cycle = (starts[-1] - starts[warmup]) / steps
    in_hooks = sum(timer.ends[i] - starts[i] for i in range(warmup, len(starts) - 1)) / steps
    cycles = [starts[i + 1] - starts[i] for i in range(warmup, len(starts) - 1)]
    cpu = timer.cpu_starts[-1] - timer.cpu_starts[warmup]
    out = {
        "steps": steps,
        "s_per_step": cycle,
        "median_s_per_step": statistics.median(cycles),
        "cpu_s_per_step": cpu / steps,
        "sys_s_per_step": (timer.usage[-1][0] - timer.usage[warmup][0]) / steps,
        "page_faults_per_step": (timer.usage[-1][1] - timer.usage[warmup][1]) / steps,
        "cells_per_s": rows_of(batches[-1]) / cycle,
        "in_hooks_s_per_step": in_hooks,
        "between_hooks_s_per_step": cycle - in_hooks,
        "global_step": int(trainer.global_step),
        "logged": sorted(str(k) for k in trainer.logged_metrics),
    }
    if profiler is not None:
        out["simple_profiler"] = simple_profile(profiler, len(batches))
    return out


# ------------------------------------------------------------------------------ the floor
def linear_layers(model: Any) -> list[dict[str, Any]]:
    """Every ``nn.Linear`` of ``model``: name, in and out features, forward FLOP per row."""
    from torch import nn

    return [
        {
            "name": name,
            "in": int(m.in_features),
            "out": int(m.out_features),
            "forward_flop_per_row": 2 * int(m.in_features) * int(m.out_features),
        }
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
    ]


def linear_flops(model: Any) -> dict[str, Any]:
    """FLOP per row of ``model``'s Linear layers: forward ``2 * in * out`` each, training 3x.

    ``autograd_train_flop_per_row`` leaves out the input-gradient product of layers fed by data
    that needs no gradient (the first Linear of the encoder): 2x forward for those, 3x for the rest.
    """
    layers = linear_layers(model)
    forward = sum(layer["forward_flop_per_row"] for layer in layers)
    fed = set(_data_fed(model))
    exact = sum(
        layer["forward_flop_per_row"] * (2 if layer["name"] in fed else 3) for layer in layers
    )
    for layer in layers:
        layer["input_needs_grad"] = layer["name"] not in fed
    return {
        "layers": layers,
        "forward_flop_per_row": forward,
        "train_flop_per_row": 3 * forward,
        "autograd_train_flop_per_row": exact,
    }


def _data_fed(model: Any) -> list[str]:
    """Names of the Linear layers whose input needs no gradient, by one forward on a DPVAE's
    encoder input of zeros (empty for another module)."""
    import torch
    from torch import nn

    encoder = getattr(model, "encoder", None)
    n_input = getattr(encoder, "n_input", None)
    if encoder is None or n_input is None:
        return []
    names = {m: n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    fed: list[str] = []

    def hook(module: Any, args: Any) -> None:
        if not args[0].requires_grad:
            fed.append(names[module])

    handles = [m.register_forward_pre_hook(hook) for m in names]
    was_training = model.training
    try:
        model.eval()
        with torch.enable_grad():
            mu, _ = encoder(torch.zeros(2, int(n_input)))
            model.decoder(mu)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return fed


def _time_call(fn: Callable[[], Any], seconds: float) -> float:
    """Median seconds of one ``fn()`` call, from chunks of at least 2 ms over ``seconds``."""
    for _ in range(3):
        fn()
    reps, elapsed = 1, 0.0
    while True:
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= 2e-3:
            break
        reps *= 4
    chunks: list[float] = [elapsed / reps]
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(chunks) < 5:
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        chunks.append((time.perf_counter() - start) / reps)
    return statistics.median(chunks)


def gemm_rate(m: int, k: int, n: int, seconds: float = 0.3) -> dict[str, Any]:
    """GFLOP/s of ``torch.matmul`` (float32) of an (m, k) by a (k, n) matrix."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    out = torch.empty(m, n)
    t = _time_call(lambda: torch.matmul(a, b, out=out), seconds)
    return {"shape": f"{m} x {k} x {n}", "seconds": t, "gflops": 2 * m * k * n / t / 1e9}


def step_gemms(flops: dict[str, Any], rows: int, seconds: float = 0.3) -> dict[str, Any]:
    """The training step's matmuls replayed on random tensors: per Linear, the forward
    ``x @ W.T + b`` (addmm), the input gradient ``g @ W`` (skipped where autograd skips it) and
    the weight gradient ``g.T @ x``, at ``rows`` rows; their summed seconds and rate."""
    import torch

    gen = torch.Generator().manual_seed(0)
    total_s, total_flop = 0.0, 0
    out: list[dict[str, Any]] = []
    per_shape = max(seconds / max(3 * len(flops["layers"]), 1), 0.02)
    for layer in flops["layers"]:
        i, o = layer["in"], layer["out"]
        x, w = torch.randn(rows, i, generator=gen), torch.randn(o, i, generator=gen)
        bias, g = torch.randn(o, generator=gen), torch.randn(rows, o, generator=gen)
        calls: list[tuple[str, Callable[[], Any]]] = [
            ("forward", partial(torch.addmm, bias, x, w.T)),
            ("grad_weight", partial(torch.matmul, g.T, x)),
        ]
        if layer["input_needs_grad"]:
            calls.append(("grad_input", partial(torch.matmul, g, w)))
        for what, fn in calls:
            t = _time_call(fn, per_shape)
            total_s += t
            total_flop += 2 * rows * i * o
            out.append(
                {
                    "layer": layer["name"],
                    "product": what,
                    "seconds": t,
                    "gflops": 2 * rows * i * o / t / 1e9,
                }
            )
    return {
        "products": out,
        "seconds_per_step": total_s,
        "flop_per_step": total_flop,
        "gflops": total_flop / total_s / 1e9,
    }


def floor(flops: dict[str, Any], rows: int, gemm_seconds: float) -> dict[str, Any]:
    """The FLOP floor of a step of ``rows`` cells: rates and floor cells/s."""
    import torch

    layers = sorted(flops["layers"], key=lambda layer: -layer["forward_flop_per_row"])
    big = layers[0] if layers else {"in": 1, "out": 1}
    shapes = [
        gemm_rate(rows, big["in"], big["out"], gemm_seconds),
        gemm_rate(rows, big["out"], big["in"], gemm_seconds),
        gemm_rate(1024, 1024, 1024, gemm_seconds),
    ]
    replay = step_gemms(flops, rows, gemm_seconds)
    per_cell = flops["train_flop_per_row"]
    return {
        "torch_threads": torch.get_num_threads(),
        "flop_per_cell": per_cell,
        "autograd_flop_per_cell": flops["autograd_train_flop_per_row"],
        "gemm": shapes,
        "step_gemms": replay,
        # the model's own products at their measured rate: cells/s if only they took time
        "floor_cells_per_s": rows / replay["seconds_per_step"],
        "floor_s_per_step": replay["seconds_per_step"],
        "model_gemm_gflops": replay["gflops"],
        # the 3x-forward FLOP count at the square product's rate: the machine's best case
        "square_gflops": shapes[-1]["gflops"],
        "square_floor_cells_per_s": shapes[-1]["gflops"] * 1e9 / per_cell,
    }


# ------------------------------------------------------------------------------ profiles
def op_profile(
    model: Any, batches: Sequence[dict[str, Any]], warmup: int, steps: int, top: int
) -> dict[str, Any]:
    """``steps`` bare steps after ``warmup`` under ``torch.profiler`` (CPU): the top ops by self
    CPU time, with their share of all ops' self time."""
    from torch.profiler import ProfilerActivity, profile

    use = list(batches[: warmup + steps])
    warm, timed = use[:warmup], use[warmup:]
    bare_loop(model, warm, 0)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        bare_loop(model, timed, 0)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    ops = [
        {
            "op": e.key,
            "calls_per_step": e.count / len(timed),
            "self_ms_per_step": e.self_cpu_time_total / 1e3 / len(timed),
            "self_pct": 100.0 * e.self_cpu_time_total / total,
        }
        for e in ranked[:top]
    ]
    return {
        "steps": len(timed),
        "profiled_s_per_step": wall / len(timed),
        "self_ms_per_step": total / 1e3 / len(timed),
        "ops": ops,
        "distinct_ops": len(events),
    }


#: cProfile groups of the model's own work in a Lightning step (the bare loop does the same):
#: label and a test on (file, function); the time is the outermost match's cumulative time
MODEL_GROUPS: list[tuple[str, Callable[[str, str], bool]]] = [
    ("DPVAE._losses (forward and losses)", lambda f, n: n == "_losses"),
    ("Tensor.backward", lambda f, n: n == "backward" and f.endswith("torch/_tensor.py")),
    (
        "AdamW update (torch.optim's functional adam)",
        lambda f, n: n in ("adam", "adamw") and "torch/optim/adam" in f,
    ),
    ("Optimizer.zero_grad", lambda f, n: n == "zero_grad" and f.endswith("optim/optimizer.py")),
]
#: groups of Lightning's own work in a step; ``own``: the matches' own times summed, else the
#: outermost match's cumulative time. They nest (log inside _log_terms): not additive.
LIGHTNING_GROUPS: list[tuple[str, Callable[[str, str], bool], str]] = [
    (
        "DPVAE.training_step (the model's losses and its logging)",
        lambda f, n: n == "training_step" and f.endswith("dpvae/module.py"),
        "cum",
    ),
    (
        "DPVAE._log_terms (its self.log / self.log_dict calls)",
        lambda f, n: n == "_log_terms",
        "cum",
    ),
    (
        "LightningModule.log / log_dict",
        lambda f, n: n in ("log", "log_dict") and f.endswith("core/module.py"),
        "cum",
    ),
    (
        "_ResultCollection.log (storing each value in a _ResultMetric)",
        lambda f, n: n == "log" and f.endswith("logger_connector/result.py"),
        "cum",
    ),
    (
        "_ResultMetric update / forward",
        lambda f, n: n in ("update", "forward", "wrapped_func") and f.endswith("result.py"),
        "cum",
    ),
    (
        "logger connector update_train_step_metrics (every step)",
        lambda f, n: n == "update_train_step_metrics",
        "cum",
    ),
    (
        "logger.log_metrics (the file write)",
        lambda f, n: n == "log_metrics" and "loggers" in f,
        "cum",
    ),
    ("callback hooks (_call_callback_hooks)", lambda f, n: n == "_call_callback_hooks", "cum"),
    ("batch_to_device", lambda f, n: n == "batch_to_device" and "strategies" in f, "cum"),
    (
        "data fetch (_DataFetcher.__next__)",
        lambda f, n: n == "__next__" and "fetchers.py" in f,
        "cum",
    ),
    ("lightning_utilities apply_to_collection", lambda f, n: n == "apply_to_collection", "cum"),
    (
        "progress counters (loops/progress.py, own time)",
        lambda f, n: "loops/progress.py" in f,
        "own",
    ),
    ("profiler stubs (profilers/, own time)", lambda f, n: "pytorch/profilers/" in f, "own"),
]
LIGHTNING_FILES = ("/lightning/", "/lightning_utilities/", "/torchmetrics/")


def _short(key: tuple[str, int, str]) -> str:
    file, line, name = key
    if file == "~":
        return name
    parts = Path(file).parts
    for anchor in ("site-packages", "work"):
        if anchor in parts:
            parts = parts[parts.index(anchor) + 1 :]
            break
    return f"{'/'.join(parts[-3:])}:{line}({name})"


def cprofile_summary(prof: Any, steps: int, top: int) -> dict[str, Any]:
    """Per-step seconds of a ``cProfile.Profile`` of ``steps`` Lightning steps: the model's own
    work (:data:`MODEL_GROUPS`), the rest (Lightning's), its :data:`LIGHTNING_GROUPS`, and the top
    functions by own time, all and Lightning's files only."""
    import pstats

    stats: Any = pstats.Stats(prof)
    raw: dict[Any, Any] = stats.stats
    total = stats.total_tt / steps

    def group(test: Callable[[str, str], bool], how: str = "cum") -> tuple[float, float] | None:
        hits = [v for k, v in raw.items() if test(k[0], k[2])]
        if not hits:
            return None
        seconds = max(v[3] for v in hits) if how == "cum" else sum(v[2] for v in hits)
        return sum(v[1] for v in hits) / steps, 1e3 * seconds / steps

    model: list[dict[str, Any]] = []
    lightning: list[dict[str, Any]] = []
    for label, test in MODEL_GROUPS:
        got = group(test)
        if got:
            model.append({"group": label, "calls_per_step": got[0], "ms_per_step": got[1]})
    for label, test, how in LIGHTNING_GROUPS:
        got = group(test, how)
        if got:
            lightning.append({"group": label, "calls_per_step": got[0], "ms_per_step": got[1]})
    model_ms = sum(g["ms_per_step"] for g in model)
    step = next((g for g in lightning if g["group"].startswith("DPVAE.training_step")), None)
    losses = next((g for g in model if g["group"].startswith("DPVAE._losses")), None)
    if step and losses:  # what training_step adds to the bare loop's _losses: its logging
        lightning.insert(
            1,
            {
                "group": "  of which outside _losses (loss sum, the terms' logging)",
                "calls_per_step": step["calls_per_step"],
                "ms_per_step": step["ms_per_step"] - losses["ms_per_step"],
            },
        )

    def rows(items: Any) -> list[dict[str, Any]]:
        return [
            {
                "function": _short(k),
                "calls_per_step": v[1] / steps,
                "own_ms_per_step": 1e3 * v[2] / steps,
                "cum_ms_per_step": 1e3 * v[3] / steps,
            }
            for k, v in items
        ]

    by_own = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)
    in_lightning = [kv for kv in by_own if any(s in kv[0][0] for s in LIGHTNING_FILES)]
    return {
        "steps": steps,
        "profiled_ms_per_step": 1e3 * total,
        "model_ms_per_step": model_ms,
        "rest_ms_per_step": 1e3 * total - model_ms,
        "lightning_files_own_ms_per_step": 1e3 * sum(v[2] for _, v in in_lightning) / steps,
        "model": model,
        "lightning": lightning,
        "top_own": rows(by_own[:top]),
        "top_own_lightning": rows(in_lightning[:top]),
    }


def simple_profile(profiler: Any, steps: int) -> list[dict[str, Any]]:
    """Lightning SimpleProfiler's actions, by total seconds (all steps, warm-up included)."""
    rows = []
    for action, durations in profiler.recorded_durations.items():
        if not durations:
            continue
        rows.append(
            {
                "action": action,
                "calls": len(durations),
                "mean_ms": 1e3 * statistics.fmean(durations),
                "total_s": float(sum(durations)),
            }
        )
    rows.sort(key=lambda r: -r["total_s"])
    return [r for r in rows if r["calls"] >= steps // 2][:20]


# ------------------------------------------------------------------------------ one dataset
def run_dataset(name: str, reference: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Every measurement of one dataset."""
    import cProfile

    from lightning.pytorch.profilers import SimpleProfiler

    tmp = Path(tempfile.mkdtemp(prefix="dpvae_step_"))
    try:
        cfg = train_config(
            reference, tmp / "run", settings["logger"], settings["threads"], settings["train_args"]
        )
        start = time.perf_counter()
        data, base = build(cfg)
        setup_s = time.perf_counter() - start
        batches = materialise(data, settings["batches"])
        rows = rows_of(batches[0])
        warmup = settings["warmup"]
        row: dict[str, Any] = {
            "dataset": name,
            "reference": reference,
            "genes": len(data.preprocessor.genes),
            "train_cells": len(data.cells("train")),
            "batch_rows": rows,
            "batch_keys": sorted(batches[0]),
            "pairs_per_batch": rows * (rows - 1) // 2
            if "pairs" not in batches[0]
            else int(batches[0]["pairs"].shape[1]),
            "batches": len(batches),
            "warmup": warmup,
            "setup_s": setup_s,
            "load_average_before": os.getloadavg()[0],
        }
        del data
        print(
            f"{name}: {row['genes']} genes, {row['train_cells']:,} training cells, "
            f"{len(batches)} batches of {rows}",
            flush=True,
        )
        bare_runs, light_runs = [], []
        for r in range(settings["repeats"]):
            bare_runs.append(bare_loop(copy.deepcopy(base), batches, warmup))
            light_runs.append(lightning_loop(copy.deepcopy(base), batches, warmup, cfg))
            print(
                f"{name}: repeat {r + 1}: bare {1e3 * bare_runs[-1]['s_per_step']:.2f} ms/step, "
                f"Lightning {1e3 * light_runs[-1]['s_per_step']:.2f} ms/step",
                flush=True,
            )
        bare_s = statistics.median(b["s_per_step"] for b in bare_runs)
        light_s = statistics.median(b["s_per_step"] for b in light_runs)
        flops = linear_flops(base)
        fl = floor(flops, rows, settings["gemm_seconds"])

        def summary(runs: list[dict[str, Any]], *extra: str) -> dict[str, Any]:
            """Medians of a loop's passes (and its best pass)."""
            median_s = statistics.median(r["s_per_step"] for r in runs)
            keys = ("cpu_s_per_step", "sys_s_per_step", "page_faults_per_step", *extra)
            return {
                "s_per_step": median_s,
                "min_s_per_step": min(r["s_per_step"] for r in runs),
                "cells_per_s": rows / median_s,
                **{k: statistics.median(r[k] for r in runs) for k in keys},
                "runs": runs,
            }

        row.update(
            bare=summary(bare_runs),
            lightning=summary(light_runs, "in_hooks_s_per_step", "between_hooks_s_per_step"),
            ratio=light_s / bare_s,
            # each Lightning pass against the bare pass just before it: robust to slow drifts
            paired_ratio=statistics.median(
                lt["s_per_step"] / b["s_per_step"] for b, lt in zip(bare_runs, light_runs)
            ),
            best_ratio=min(b["s_per_step"] for b in light_runs)
            / min(b["s_per_step"] for b in bare_runs),
            overhead_s_per_step=light_s - bare_s,
            flops=flops,
            floor=fl,
        )
        row["bare"]["pct_floor"] = 100.0 * row["bare"]["cells_per_s"] / fl["floor_cells_per_s"]
        row["lightning"]["pct_floor"] = (
            100.0 * row["lightning"]["cells_per_s"] / fl["floor_cells_per_s"]
        )
        row["bare"]["pct_square_floor"] = (
            100.0 * row["bare"]["cells_per_s"] / fl["square_floor_cells_per_s"]
        )
        row["lightning"]["pct_square_floor"] = (
            100.0 * row["lightning"]["cells_per_s"] / fl["square_floor_cells_per_s"]
        )
        if settings["profile_steps"] > 0:
            steps = min(settings["profile_steps"], len(batches) - min(warmup, len(batches) - 1))
            row["profile"] = op_profile(
                copy.deepcopy(base),
                batches,
                min(warmup, len(batches) - steps),
                steps,
                settings["top"],
            )
        if settings["lightning_profile"]:
            prof = cProfile.Profile()
            prof_run = lightning_loop(copy.deepcopy(base), batches, warmup, cfg, profile=prof)
            simple = SimpleProfiler(dirpath=str(tmp), filename="simple_profiler")
            simple_run = lightning_loop(copy.deepcopy(base), batches, warmup, cfg, profiler=simple)
            steps = len(batches) - warmup
            row["lightning_profile"] = {
                "cprofile": cprofile_summary(prof, steps, settings["top"]),
                "cprofile_run_s_per_step": prof_run["s_per_step"],
                "simple_profiler": simple_run["simple_profiler"],
                "simple_profiler_run_s_per_step": simple_run["s_per_step"],
            }
        row["load_average_after"] = os.getloadavg()[0]
        return row
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------ reporting
def _ms(s: float) -> str:
    return f"{1e3 * s:.2f}"


def summary_table(rows: list[dict[str, Any]]) -> str:
    """One Markdown row per dataset: loops (median and best pass), ratio, floor."""
    lines = [
        "| dataset | genes | cells/batch | bare ms/step (best) | Lightning ms/step (best) "
        "| Lightning / bare (paired; best) | bare cells/s | Lightning cells/s | MFLOP/cell "
        "| floor cells/s | bare % floor | Lightning % floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b, lt, fl = r["bare"], r["lightning"], r["floor"]
        lines.append(
            f"| {r['dataset']} | {r['genes']} | {r['batch_rows']} "
            f"| {_ms(b['s_per_step'])} ({_ms(b['min_s_per_step'])}) "
            f"| {_ms(lt['s_per_step'])} ({_ms(lt['min_s_per_step'])}) "
            f"| {r['ratio']:.2f}x ({r['paired_ratio']:.2f}x; {r['best_ratio']:.2f}x) "
            f"| {b['cells_per_s']:,.0f} | {lt['cells_per_s']:,.0f} "
            f"| {fl['flop_per_cell'] / 1e6:.3f} | {fl['floor_cells_per_s']:,.0f} "
            f"| {b['pct_floor']:.1f}% | {lt['pct_floor']:.1f}% |"
        )
    return "\n".join(lines)


def markdown(rows: list[dict[str, Any]], info: dict[str, Any], settings: dict[str, Any]) -> str:
    """The summary, then per dataset the floor, the op profile and Lightning's profile."""
    out = [
        "# Training step: bare PyTorch loop, Lightning, FLOP floor",
        "",
        "Command: `python -m benchmarks.step "
        + " ".join(
            f"{k}={_show(settings[k])}" for k in ("datasets", "batches", "warmup", "repeats")
        )
        + "` (`benchmarks/step.py`). The same model (dpvae's default, `model.warmup_epochs=0`: "
        "the distance regularizer on) and the same materialised batches in every loop; data "
        "loading is not timed. A Lightning step is one cycle of its loop (batch start to the next "
        "batch's start), Trainer setup excluded. Floor: the step's `nn.Linear` matmuls alone "
        "(forward, input and weight gradients, replayed at the batch's shapes); "
        "MFLOP/cell counts 3x the forward `2 * in * out` of every Linear. Medians of "
        f"{settings['repeats']} alternating passes (in brackets: the best pass; the paired ratio is "
        "the median of each Lightning pass over the bare pass before it; this machine's speed "
        "drifts by up to ~40% between passes), "
        f"{settings['threads']} torch thread(s).",
        "",
        summary_table(rows),
        "",
    ]
    for r in rows:
        b, lt, fl = r["bare"], r["lightning"], r["floor"]
        out += [
            f"## {r['dataset']}",
            "",
            f"{r['genes']} genes, {r['train_cells']:,} training cells, {r['batches']} batches of "
            f"{r['batch_rows']} cells ({r['pairs_per_batch']:,} regularizer pairs each), "
            f"{r['warmup']} warm-up steps per pass; setup (read, genes, split) {r['setup_s']:.1f} s; "
            f"load average {r['load_average_before']:.2f} before, {r['load_average_after']:.2f} "
            "after.",
            "",
            f"- bare: {_ms(b['s_per_step'])} ms/step (best pass {_ms(b['min_s_per_step'])}; CPU "
            f"{_ms(b['cpu_s_per_step'])}, of which system {_ms(b['sys_s_per_step'])}; "
            f"{b['page_faults_per_step']:,.0f} page faults/step), {b['cells_per_s']:,.0f} cells/s",
            f"- Lightning: {_ms(lt['s_per_step'])} ms/step (best pass "
            f"{_ms(lt['min_s_per_step'])}; CPU {_ms(lt['cpu_s_per_step'])}, of which system "
            f"{_ms(lt['sys_s_per_step'])}; {lt['page_faults_per_step']:,.0f} page faults/step), "
            f"{lt['cells_per_s']:,.0f} cells/s; of which "
            f"{_ms(lt['in_hooks_s_per_step'])} ms between a batch's start and end hooks "
            f"(training_step, backward, optimizer) and {_ms(lt['between_hooks_s_per_step'])} ms "
            "outside them (fetch, transfer, logger connector)",
            f"- Lightning / bare: {r['ratio']:.2f}x ({_ms(r['overhead_s_per_step'])} ms/step "
            f"more); paired passes {r['paired_ratio']:.2f}x, best passes {r['best_ratio']:.2f}x; "
            "per pass (ms/step): bare "
            + ", ".join(_ms(x["s_per_step"]) for x in b["runs"])
            + "; Lightning "
            + ", ".join(_ms(x["s_per_step"]) for x in lt["runs"]),
            f"- FLOP per training cell: {fl['flop_per_cell'] / 1e6:.3f} M (3x forward; "
            f"{fl['autograd_flop_per_cell'] / 1e6:.3f} M without the input gradient autograd "
            "skips for the data-fed layer)",
            f"- matmul rate: the model's GEMMs {fl['model_gemm_gflops']:.1f} GFLOP/s "
            f"({_ms(fl['floor_s_per_step'])} ms/step), "
            + ", ".join(f"{g['shape']} {g['gflops']:.1f}" for g in fl["gemm"])
            + " GFLOP/s",
            f"- floor: {fl['floor_cells_per_s']:,.0f} cells/s at the model's GEMM rate (bare "
            f"{b['pct_floor']:.1f}%, Lightning {lt['pct_floor']:.1f}%); "
            f"{fl['square_floor_cells_per_s']:,.0f} cells/s at the square product's rate (bare "
            f"{b['pct_square_floor']:.1f}%, Lightning {lt['pct_square_floor']:.1f}%)",
            "",
        ]
        layers = r["flops"]["layers"]
        out += [
            "| Linear | in | out | forward FLOP/row | input gradient |",
            "|---|---|---|---|---|",
        ]
        out += [
            f"| {la['name']} | {la['in']} | {la['out']} | {la['forward_flop_per_row']:,} "
            f"| {'yes' if la['input_needs_grad'] else 'no'} |"
            for la in layers
        ]
        out.append("")
        prof = r.get("profile")
        if prof:
            out += [
                f"Top ops of {prof['steps']} bare steps by self CPU time (torch.profiler; "
                f"{prof['profiled_s_per_step'] * 1e3:.2f} ms/step profiled, "
                f"{prof['self_ms_per_step']:.2f} ms/step of ops' self time, "
                f"{prof['distinct_ops']} distinct ops):",
                "",
                "| op | calls/step | self ms/step | % |",
                "|---|---|---|---|",
            ]
            out += [
                f"| `{o['op']}` | {o['calls_per_step']:.0f} | {o['self_ms_per_step']:.3f} "
                f"| {o['self_pct']:.1f}% |"
                for o in prof["ops"]
            ]
            out.append("")
        lp = r.get("lightning_profile")
        if lp:
            cp = lp["cprofile"]
            out += [
                f"Where a Lightning step goes (cProfile of {cp['steps']} steps: "
                f"{cp['profiled_ms_per_step']:.2f} ms/step under the profiler, against "
                f"{_ms(lp['cprofile_run_s_per_step'])} ms measured in that pass; the profiler "
                "inflates Python-heavy code most). The model's own work, as the bare loop does "
                f"it: {cp['model_ms_per_step']:.2f} ms/step; the rest, Lightning's: "
                f"{cp['rest_ms_per_step']:.2f} ms/step ({cp['lightning_files_own_ms_per_step']:.2f}"
                " ms/step own time in lightning / lightning_utilities / torchmetrics files).",
                "",
                "| model's work | calls/step | ms/step |",
                "|---|---|---|",
            ]
            out += [
                f"| {g['group']} | {g['calls_per_step']:.1f} | {g['ms_per_step']:.3f} |"
                for g in cp["model"]
            ]
            out += [
                "",
                "| Lightning's work (groups nest: not additive) | calls/step | ms/step |",
                "|---|---|---|",
            ]
            out += [
                f"| {g['group']} | {g['calls_per_step']:.1f} | {g['ms_per_step']:.3f} |"
                for g in cp["lightning"]
            ]
            for title, key in (
                ("Top functions by own time", "top_own"),
                ("Top functions of Lightning's files by own time", "top_own_lightning"),
            ):
                out += [
                    "",
                    f"{title} (cProfile):",
                    "",
                    "| function | calls/step | own ms/step | cumulative ms/step |",
                    "|---|---|---|---|",
                ]
                out += [
                    f"| `{f['function']}` | {f['calls_per_step']:.1f} "
                    f"| {f['own_ms_per_step']:.3f} | {f['cum_ms_per_step']:.3f} |"
                    for f in cp[key]
                ]
            out += [
                "",
                "Lightning's SimpleProfiler (all steps of one pass, warm-up included; "
                f"{_ms(lp['simple_profiler_run_s_per_step'])} ms/step with it on):",
                "",
                "| action | calls | mean ms |",
                "|---|---|---|",
            ]
            out += [
                f"| `{a['action']}` | {a['calls']} | {a['mean_ms']:.3f} |"
                for a in lp["simple_profiler"]
            ]
            out.append("")
    out += [
        f"Machine: {info.get('cpu', '?')}, {info.get('cpu_count')} cores "
        f"({info.get('cpus_available')} available), {info.get('mem_total_gb')} GB RAM; torch "
        f"threads {settings['threads']}; Python {info.get('python')}, torch {info.get('torch')}, "
        f"lightning {info.get('lightning')}, commit {info.get('commit')}"
        f"{' with uncommitted changes' if info.get('uncommitted_changes') else ''}; environment "
        + ", ".join(f"{k}={v}" for k, v in (info.get("env") or {}).items() if v is not None)
        + ".",
    ]
    return "\n".join(out) + "\n"


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


# ------------------------------------------------------------------------------ the command
def config_from(cfg: DictConfig) -> dict[str, Any]:
    """The plain settings of a composed configuration.

    Raises:
        ConfigError: no dataset, or a count out of range.
    """
    from omegaconf import OmegaConf

    plain: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    plain["datasets"] = [str(d) for d in plain["datasets"] or []]
    if not plain["datasets"]:
        raise ConfigError("datasets must name at least one dataset")
    for key, least in (
        ("batches", 2),
        ("threads", 1),
        ("repeats", 1),
        ("cells", 100),
        ("n_genes", 1),
        ("top", 1),
    ):
        if int(plain[key]) < least:
            raise ConfigError(f"{key} must be at least {least}, got {plain[key]}")
    for key in ("warmup", "profile_steps"):
        if int(plain[key]) < 0:
            raise ConfigError(f"{key} must be 0 or more, got {plain[key]}")
    if plain["warmup"] + 2 > plain["batches"]:
        raise ConfigError(
            f"warmup={plain['warmup']} leaves under 2 timed steps of batches={plain['batches']}"
        )
    plain["train_args"] = [str(a) for a in plain.get("train_args") or []]
    return plain


def work(cfg: DictConfig) -> int:
    """Every dataset of a composed configuration; writes the results as they come."""
    settings = config_from(cfg)
    import logging

    import lightning.pytorch  # noqa: F401 - sets its loggers' level on import: quiet them after
    import torch

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)

    from benchmarks.scale import machine

    torch.set_num_threads(int(settings["threads"]))
    out = Path(settings["out"])
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    info["env"] = {
        k: os.environ.get(k)
        for k in (
            "OMP_NUM_THREADS",
            "MALLOC_MMAP_THRESHOLD_",
            "MALLOC_TRIM_THRESHOLD_",
            "GLIBC_TUNABLES",
        )
    }
    rows: list[dict[str, Any]] = []
    for name in settings["datasets"]:
        if name == "synthetic":
            ref = synthetic_reference(
                Path(settings["data_dir"]),
                int(settings["cells"]),
                int(settings["n_genes"]),
                float(settings["density"]),
                int(settings["seed"]),
            )
            label = f"synthetic {settings['cells']:,} x {settings['n_genes']}"
            rows.append(run_dataset(label, str(ref.resolve()), settings))
        else:
            rows.append(run_dataset(name, name, settings))
        doc = {"machine": info, "config": settings, "datasets": rows}
        (out / "results.json").write_text(json.dumps(doc, indent=1, default=str))
        (out / "results.md").write_text(markdown(rows, info, settings))
    if settings["report"]:
        DOCS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "results.md", DOCS / "step.md")
        shutil.copyfile(out / "results.json", DOCS / "step.json")
        print(f"copied to {DOCS / 'step.md'} and {DOCS / 'step.json'}", flush=True)
    print(summary_table(rows), flush=True)
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for a usage error)."""
    from dpvae.cli import command

    return command("python -m benchmarks.step", SUMMARY, CONF_DIR, ROOT_FILE, work)(argv)


if __name__ == "__main__":
    if "OMP_NUM_THREADS" not in os.environ:  # before torch and numpy load their thread pools
        threads = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("threads=")), "1")
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = threads
    sys.exit(main())
