"""Time and peak memory of training and prediction as the reference grows, on synthetic data.

Run from the repository root of a checkout (keys and defaults: ``benchmarks/conf/scale.yaml``,
``--help`` prints them)::

    python -m benchmarks.scale cells=100000,250000,1000000 modes=memory,streaming out=bench_out/scale

For every size a synthetic count reference (:mod:`benchmarks.synthetic`: ``n_genes`` genes, about
``density`` non-zeros, CSR) and a query of as many new cells of the same tissue in the reference's
frame are written once under ``data_dir`` and reused by later runs. For every (size, mode) --
``memory`` trains with ``data.backed=false``, ``streaming`` with ``data.backed=true`` -- one fresh
process runs the training command's own code (``dpvae.cli.train_main``: ``dpvae.pipeline.train``
and the embedding write) for ``epochs`` epochs with the distance regularizer on from the first
(``model.warmup_epochs=0``), ``logger=none`` and ``threads`` torch threads. Stage boundaries come
from a wrapper around ``pipeline.build_datamodule``, a Lightning callback added with
``+callbacks.scale_stages`` and a wrapper around ``placement.embed_reference``; a background thread
samples ``VmRSS`` every 20 ms and each boundary reads and resets ``VmHWM``
(``/proc/self/clear_refs``), so each stage's peak is the process's resident peak within it. The
stages:

- ``setup``: reading, statistics, gene selection, PCA, split (``build_datamodule``);
- ``prepare``: model, the data fingerprint and the trainer, up to Lightning's ``fit`` start;
- ``epoch``: the training batches of an epoch (cells/s = training cells / the epoch's seconds);
- ``validation``: the validation loop with the ``SpatialValidation`` callback;
- ``checkpoint``: after validation to the epoch's end (checkpoint and report callbacks);
- ``embedding``: embedding every reference cell and writing ``embedding.h5ad``;
- ``predict``: ``python -m dpvae.predict`` of the query against the run's reference in its own
  process, end to end (read, encode, neighbour search, scores against the query's true
  coordinates, write), peak memory from the child's ``wait4`` resource usage.

A (size, mode) whose peak, extrapolated linearly from that mode's two largest finished sizes, would
exceed ``max_rss_gb`` is skipped and recorded as such. Writes ``results.json`` (every stage of every
run, the machine), ``results.md`` (the table and the targets with PASS/FAIL) and ``scale.png``
(seconds and peak memory against cells, one line per main stage and mode) to ``out``; ``figure=PATH``
also copies the figure there.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from dpvae.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent / "conf"
ROOT = CONF_DIR.parents[1]
ROOT_FILE = "scale.yaml"
MODES = {"memory": "false", "streaming": "true"}
STAGES = ("setup", "prepare", "epoch", "validation", "checkpoint", "embedding", "predict")
FIGURE_STAGES = ("setup", "epoch", "validation", "embedding", "predict")
TRAIN_STAGES = ("setup", "prepare", "sanity", "epoch", "validation", "checkpoint", "finish")
SUMMARY = """
Time and peak memory of dpvae's training stages (setup, one epoch, validation, embedding write)
and of prediction, on synthetic references of growing size, in memory (data.backed=false) and
streaming (data.backed=true); one fresh process per (size, mode). Writes results.json,
results.md (with the scale targets, PASS/FAIL) and scale.png to out.
"""
GB = 2**30


# ------------------------------------------------------------------------------ measuring
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _children(pid: int) -> list[int]:
    """The process ids of ``pid``'s children (DataLoader workers)."""
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                out += [int(p) for p in fh.read().split()]
    except OSError:
        pass
    return out


def _private_kb(pid: int) -> int:
    """Memory only ``pid`` holds (private clean + dirty pages: what a forked worker adds)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            return sum(
                int(line.split()[1])
                for line in fh
                if line.startswith(("Private_Clean:", "Private_Dirty:"))
            )
    except OSError:
        return 0


class Timeline:
    """Stage marks of one process with each stage's wall and CPU seconds and resident peak.

    ``mark(name)`` ends the current stage and starts ``name``. The stage's ``peak_mb`` is the
    process's own peak: the larger of ``VmHWM`` read at its end (reset at its start through
    ``/proc/self/clear_refs``) and the largest ``VmRSS`` a 20 ms sampling thread saw within it.
    ``tree_peak_mb`` adds the memory of its worker processes (DataLoader workers): the largest
    sampled ``VmRSS`` plus the workers' private memory (``smaps_rollup``, every 100 ms), at least
    ``peak_mb``. ``cpu_seconds`` is this process's CPU time (the workers' is not counted).
    """

    def __init__(self, interval: float = 0.02) -> None:
        self.stages: list[dict[str, Any]] = []
        self.samples: list[tuple[float, int, int]] = []
        self._sampled_peak = 0
        self._tree_peak = 0
        self._workers = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._interval = interval
        self._pid = os.getpid()
        self._can_reset = self._reset_hwm()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    @staticmethod
    def _reset_hwm() -> bool:
        from benchmarks.protocol import _reset_peak

        return _reset_peak()

    def _sample(self) -> None:
        start = time.perf_counter()
        tick, extra, n_workers = 0, 0, 0
        while not self._stop.wait(self._interval):
            rss = _status_kb("VmRSS")
            if tick % 5 == 0:
                workers = _children(self._pid)
                extra, n_workers = sum(_private_kb(p) for p in workers), len(workers)
            tick += 1
            with self._lock:
                self._sampled_peak = max(self._sampled_peak, rss)
                self._tree_peak = max(self._tree_peak, rss + extra)
                self._workers = max(self._workers, n_workers)
                if len(self.samples) < 500_000:
                    self.samples.append((time.perf_counter() - start, rss, extra))

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        with self._lock:
            if self.stages:
                stage = self.stages[-1]
                hwm = _status_kb("VmHWM")
                stage["seconds"] = now - stage["start"]
                stage["cpu_seconds"] = time.process_time() - stage["cpu_start"]
                stage["peak_mb"] = max(hwm, self._sampled_peak, _status_kb("VmRSS")) / 1024
                stage["tree_peak_mb"] = max(stage["peak_mb"], self._tree_peak / 1024)
                stage["workers"] = self._workers
                stage["hwm_mb"] = hwm / 1024
            if self._can_reset:
                self._reset_hwm()
            self._sampled_peak = self._tree_peak = _status_kb("VmRSS")
            self._workers = 0
            self.stages.append(
                {
                    "name": name,
                    "start": now,
                    "cpu_start": time.process_time(),
                    "rss_start_mb": self._sampled_peak / 1024,
                }
            )

    def close(self) -> list[dict[str, Any]]:
        self.mark("end")
        self._stop.set()
        self._thread.join()
        return self.stages[:-1]


TIMELINE: Timeline | None = None


def _mark(name: str) -> None:
    if TIMELINE is not None:
        TIMELINE.mark(name)


def _stage_callback() -> Any:
    import lightning as L

    class StageMarks(L.Callback):
        """Marks the Lightning stages of a run on the process's :class:`Timeline`."""

        def __init__(self) -> None:
            self.cells = 0
            self.batches = 0
            self.epoch_cells: list[int] = []

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            _mark("fit_start")

        def on_sanity_check_start(self, trainer: Any, pl_module: Any) -> None:
            _mark("sanity")

        def on_sanity_check_end(self, trainer: Any, pl_module: Any) -> None:
            _mark("fit_start")

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            self.cells = 0
            _mark("epoch")

        def on_train_batch_end(
            self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, i: int
        ) -> None:
            self.batches += 1
            if isinstance(batch, dict):
                first = batch.get("index", batch.get("raw"))
                self.cells += int(first.shape[0]) if first is not None else 0

        def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
            if not trainer.sanity_checking:
                self.epoch_cells.append(self.cells)
                _mark("validation")

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            if not trainer.sanity_checking:
                _mark("checkpoint")

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            if len(self.epoch_cells) < trainer.current_epoch + 1:  # no validation this epoch
                self.epoch_cells.append(self.cells)
                _mark("checkpoint")

        def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
            _mark("finish")

    return StageMarks


STAGE_MARKS: Any = None


def stage_marks() -> Any:
    """The stage-marking callback (``+callbacks.scale_stages={_target_: benchmarks.scale.stage_marks}``)."""
    global STAGE_MARKS
    STAGE_MARKS = _stage_callback()()
    return STAGE_MARKS


def train_child(spec_path: str) -> None:
    """Run the training command of ``spec_path`` (JSON) in this process; write its timeline."""
    global TIMELINE
    TIMELINE = Timeline()
    _mark("import")
    spec = json.loads(Path(spec_path).read_text())
    import torch

    from dpvae import pipeline, placement
    from dpvae.cli import train_main

    build, embed = pipeline.build_datamodule, placement.embed_reference
    info: dict[str, Any] = {}

    def timed_build(*args: Any, **kwargs: Any) -> Any:
        _mark("setup")
        data = build(*args, **kwargs)
        _mark("prepare")
        raw = getattr(data, "_raw", None)
        info["raw_type"] = type(raw).__name__ if raw is not None else None
        return data

    def timed_embed(*args: Any, **kwargs: Any) -> Any:
        _mark("embedding")
        return embed(*args, **kwargs)

    pipeline.build_datamodule = timed_build  # type: ignore[assignment]
    placement.embed_reference = timed_embed  # type: ignore[assignment]
    rc = train_main(spec["args"])
    stages = TIMELINE.close()
    result = {
        "rc": rc,
        "torch_threads": torch.get_num_threads(),
        "stages": [{k: v for k, v in s.items() if k not in ("start", "cpu_start")} for s in stages],
        "epoch_cells": list(STAGE_MARKS.epoch_cells) if STAGE_MARKS else [],
        "batches": STAGE_MARKS.batches if STAGE_MARKS else 0,
        "rss_samples": TIMELINE.samples[:: max(1, len(TIMELINE.samples) // 2000)],
        **info,
    }
    Path(spec["result"]).write_text(json.dumps(result))


def run_child(cmd: list[str], log: Path, timeout: float, env: dict[str, str]) -> dict[str, Any]:
    """Run ``cmd`` with output to ``log``; its exit status, wall seconds and peak RSS (wait4)."""
    start = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > timeout:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                status = -1
                break
            time.sleep(0.05)
        proc.returncode = 0  # reaped here; keep Popen from waiting again
    rc = os.waitstatus_to_exitcode(status) if status != -1 else "timeout"
    return {
        "rc": rc,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_mb": usage.ru_maxrss / 1024,
    }


# ------------------------------------------------------------------------------ the data
def data_files(
    data_dir: Path, n: int, n_genes: int, density: float, seed: int, dense: bool
) -> tuple[Path, Path]:
    """(reference, query) of one size, written on first use (a query of n new cells)."""
    from benchmarks import synthetic

    tag = f"synth_{n}x{n_genes}_d{density:g}_seed{seed}{'_dense' if dense else ''}"
    ref, query = data_dir / f"{tag}_ref.h5ad", data_dir / f"{tag}_query.h5ad"
    if not (ref.exists() and query.exists()):
        tissue = synthetic.make_tissue(seed, n_genes, density)
        for path, section in ((ref, 0), (query, 1)):
            if not path.exists():
                start = time.perf_counter()
                synthetic.write_section(path, tissue, n, seed, section, dense, own_frame=False)
                print(f"wrote {path} in {time.perf_counter() - start:.0f} s", flush=True)
    return ref, query


# ------------------------------------------------------------------------------ one run
def _stage_totals(stages: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for s in stages:
        agg = out.setdefault(
            s["name"],
            {"seconds": 0.0, "cpu_seconds": 0.0, "peak_mb": 0.0, "own_peak_mb": 0.0, "count": 0},
        )
        agg["seconds"] += s["seconds"]
        agg["cpu_seconds"] += s.get("cpu_seconds", float("nan"))
        # peak_mb: the process and its DataLoader workers; own_peak_mb: the process alone
        agg["peak_mb"] = max(agg["peak_mb"], s.get("tree_peak_mb", s["peak_mb"]))
        agg["own_peak_mb"] = max(agg["own_peak_mb"], s["peak_mb"])
        agg["workers"] = max(agg.get("workers", 0), s.get("workers", 0))
        agg["count"] += 1
    return out


def _parse_train_log(text: str) -> dict[str, int]:
    import re

    m = re.search(r"(\d+) genes, (\d+) train / (\d+) validation cells", text)
    return {"genes": int(m[1]), "train_cells": int(m[2]), "val_cells": int(m[3])} if m else {}


def _parse_scores(text: str) -> str:
    for line in text.splitlines():
        if "scores against the query's true coordinates:" in line:
            return line.split(":", 2)[-1].strip()
    return ""


def summarise(row: dict[str, Any]) -> None:
    """Per-stage totals, peaks and the epoch throughput of a run from its timeline."""
    stages = _stage_totals(row["timeline"])
    epochs = [s for s in row["timeline"] if s["name"] == "epoch"]
    rows_seen = row.get("cells_per_epoch") or []
    if epochs and rows_seen:
        # an epoch visits every training cell; its batches may hold some twice (neighbour pairs)
        n = row.get("train_cells") or rows_seen[-1]
        last = epochs[-1]["seconds"]
        row["epoch_seconds"] = [s["seconds"] for s in epochs]
        row["cells_per_s"] = n / last if last > 0 else None
        cpu = epochs[-1].get("cpu_seconds")
        row["cells_per_cpu_s"] = n / cpu if cpu else None
        row["epoch_cells"] = n
        row["epoch_batch_rows"] = rows_seen[-1]
    predict = row.get("stages", {}).get("predict")
    row["stages"] = {k: v for k, v in stages.items() if k not in ("import", "fit_start")}
    if predict:
        row["stages"]["predict"] = predict
    train_peaks = [v["peak_mb"] for k, v in stages.items() if k in TRAIN_STAGES]
    row["train_peak_mb"] = max(train_peaks) if train_peaks else None
    row["process_peak_mb"] = max(v["peak_mb"] for v in stages.values())


def run_one(n: int, mode: str, ref: Path, query: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """Train and predict one (size, mode) in fresh processes; its stages and totals."""
    out = Path(cfg["out"])
    run_dir = out / "runs" / f"{n}_{mode}"
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    threads = str(cfg["threads"])
    env = dict(
        os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads
    )
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    args = [
        f"data.reference={ref.resolve()}",
        f"data.backed={MODES[mode]}",
        f"run_dir={run_dir.resolve()}",
        f"trainer.max_epochs={cfg['epochs']}",
        "model.warmup_epochs=0",
        "logger=none",
        f"threads={cfg['threads']}",
        "resume=false",
        "trainer.enable_progress_bar=false",
        "+callbacks.scale_stages={_target_: benchmarks.scale.stage_marks}",
        *cfg["train_args"],
    ]
    spec = run_dir.parent / f"{n}_{mode}.spec.json"
    result_file = run_dir.parent / f"{n}_{mode}.result.json"
    result_file.unlink(missing_ok=True)
    spec.write_text(json.dumps({"args": args, "result": str(result_file.resolve())}))
    code = "import sys; from benchmarks.scale import train_child; train_child(sys.argv[1])"
    train_log = logs / f"{n}_{mode}_train.log"
    load_before = os.getloadavg()[0]
    child = run_child(
        [sys.executable, "-c", code, str(spec.resolve())], train_log, cfg["timeout"], env
    )
    row: dict[str, Any] = {"cells": n, "mode": mode, "status": "ok", "train_process": child}
    row["load_average"] = [load_before, os.getloadavg()[0]]
    log_text = train_log.read_text(errors="replace")
    row.update(_parse_train_log(log_text))
    res: dict[str, Any] = {"rc": None}
    if result_file.exists():
        res = json.loads(result_file.read_text())
    if child["rc"] != 0 or res["rc"] != 0:
        row["status"] = f"train failed ({child['rc']}); see {train_log}"
        row["log_tail"] = log_text[-2000:]
        return row
    row.update(
        torch_threads=res["torch_threads"],
        raw_type=res.get("raw_type"),
        batches=res["batches"],
        timeline=res["stages"],
        cells_per_epoch=res["epoch_cells"],
        rss_samples=res["rss_samples"],
    )
    summarise(row)
    if mode in cfg["predict"]:
        output = run_dir / "prediction.h5ad"
        cmd = [
            sys.executable,
            "-m",
            "dpvae.predict",
            f"checkpoint={(run_dir / 'model.ckpt').resolve()}",
            f"query={query.resolve()}",
            f"output={output.resolve()}",
            "overwrite=true",
        ]
        pred_log = logs / f"{n}_{mode}_predict.log"
        pred = run_child(cmd, pred_log, cfg["timeout"], env)
        text = pred_log.read_text(errors="replace")
        row["stages"]["predict"] = {
            "seconds": pred["seconds"],
            "cpu_seconds": pred["cpu_seconds"],
            "peak_mb": pred["peak_mb"],
            "count": 1,
        }
        row["predict_rc"] = pred["rc"]
        row["scores"] = _parse_scores(text)
        if pred["rc"] != 0:
            row["status"] = f"predict failed ({pred['rc']}); see {pred_log}"
            row["log_tail"] = text[-2000:]
        if not cfg["keep_outputs"]:
            output.unlink(missing_ok=True)
    if not cfg["keep_outputs"]:
        for name in ("embedding.h5ad", "model.ckpt", "last.ckpt"):
            (run_dir / name).unlink(missing_ok=True)
    return row


# ------------------------------------------------------------------------------ reporting
def machine() -> dict[str, Any]:
    """Facts of the machine and the software the numbers come from."""
    from importlib.metadata import version

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_total_gb"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    for pkg in ("torch", "lightning", "anndata", "numpy", "scipy", "h5py"):
        try:
            info[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - a missing package is a fact, not an error
            info[pkg] = None
    try:
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        info["uncommitted_changes"] = bool(status.strip())
        if status.strip():  # which working tree: a hash of its difference from the commit
            import hashlib

            diff = subprocess.run(
                ["git", "diff", "HEAD"], cwd=ROOT, capture_output=True, timeout=30
            ).stdout
            info["diff_sha1"] = hashlib.sha1(diff).hexdigest()[:12]
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def _gb(mb: float | None) -> str:
    return "—" if mb is None else f"{mb / 1024:.2f}"


def _sec(s: float | None) -> str:
    return "—" if s is None else f"{s:.1f}"


def _find(rows: list[dict[str, Any]], n: int, mode: str) -> dict[str, Any] | None:
    for r in rows:
        if r["cells"] == n and r["mode"] == mode and r["status"] == "ok":
            return r
    return None


def targets(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(target, measured, PASS/FAIL/n.a.) of the scale targets, from the runs that exist."""
    out: list[tuple[str, str, str]] = []
    big = 1_000_000
    s1m = _find(rows, big, "streaming")
    if s1m:
        peak = s1m["train_peak_mb"]
        verdict = "PASS" if peak < 3 * 1024 else "FAIL"
        out.append(
            ("one epoch over 1M x 2000 (streaming) at peak RSS < 3 GB", f"{_gb(peak)} GB", verdict)
        )
    else:
        out.append(("one epoch over 1M x 2000 (streaming) at peak RSS < 3 GB", "not run", "n.a."))
    m1m = _find(rows, big, "memory")
    if m1m:
        peak = m1m["train_peak_mb"]
        out.append(
            (
                "(the same in memory, for reference)",
                f"{_gb(peak)} GB",
                "PASS" if peak < 3 * 1024 else "FAIL",
            )
        )
    s250 = _find(rows, 250_000, "streaming")
    label = "streaming peak at 1M <= peak at 250k + 0.25 GB"
    if s1m and s250:
        diff = s1m["train_peak_mb"] - s250["train_peak_mb"]
        out.append((label, f"{diff / 1024:+.2f} GB", "PASS" if diff <= 0.25 * 1024 else "FAIL"))
    else:
        out.append((label, "not run", "n.a."))
    sizes = sorted({r["cells"] for r in rows})
    both = [n for n in sizes if _find(rows, n, "memory") and _find(rows, n, "streaming")]
    label = "streaming throughput >= 0.7x in-memory (same data)"
    for n in both:
        mem, st = _find(rows, n, "memory"), _find(rows, n, "streaming")
        assert mem and st
        if mem.get("cells_per_s") and st.get("cells_per_s"):
            ratio = st["cells_per_s"] / mem["cells_per_s"]
            measured = f"{ratio:.2f}x"
            if mem.get("cells_per_cpu_s") and st.get("cells_per_cpu_s"):
                measured += (
                    f" ({st['cells_per_cpu_s'] / mem['cells_per_cpu_s']:.2f}x per CPU second)"
                )
            out.append((f"{label}, {n:,} cells", measured, "PASS" if ratio >= 0.7 else "FAIL"))
    if not both:
        out.append((label, "not run", "n.a."))
    label = "predict 1M query vs 1M reference < 10 min and < 4 GB"
    pred = [
        r
        for r in rows
        if r["cells"] == big and r["status"] == "ok" and "predict" in r.get("stages", {})
    ]
    for r in pred:
        p = r["stages"]["predict"]
        ok = p["seconds"] < 600 and p["peak_mb"] < 4 * 1024
        out.append(
            (
                f"{label} ({r['mode']} run)",
                f"{p['seconds']:.0f} s, {_gb(p['peak_mb'])} GB",
                "PASS" if ok else "FAIL",
            )
        )
    if not pred:
        out.append((label, "not run", "n.a."))
    return out


def markdown(rows: list[dict[str, Any]], info: dict[str, Any], cfg: dict[str, Any]) -> str:
    """The results table, the targets and the machine, as Markdown."""
    shown = ("setup", "epoch", "validation", "embedding", "predict")
    head = "| cells | mode | " + " | ".join(f"{s} s (CPU s) | {s} GB" for s in shown)
    head += " | cells/s (per CPU s) | train peak GB | load |"
    lines = [head, "|" + "---|" * (2 + 2 * len(shown) + 3)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(
                f"| {r['cells']:,} | {r['mode']} | {r['status']} |" + " |" * (2 * len(shown) + 2)
            )
            continue
        cells = []
        for stage in shown:
            st = r["stages"].get(stage)
            if not st:
                cells += ["—", "—"]
                continue
            cpu = st.get("cpu_seconds")
            text = _sec(st["seconds"]) + ("" if cpu is None or cpu != cpu else f" ({cpu:.1f})")
            cells += [text, _gb(st["peak_mb"])]
        cps, cpc = r.get("cells_per_s"), r.get("cells_per_cpu_s")
        rate = "—" if cps is None else f"{cps:,.0f}" + ("" if not cpc else f" ({cpc:,.0f})")
        load = r.get("load_average")
        load_text = "—" if not load else f"{max(load):.1f}"
        lines.append(
            f"| {r['cells']:,} | {r['mode']} | "
            + " | ".join(cells)
            + f" | {rate} | {_gb(r.get('train_peak_mb'))} | {load_text} |"
        )
    lines += ["", "| target | measured | |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {v} |" for t, m, v in targets(rows)]
    scores = [(r["cells"], r["mode"], r["scores"]) for r in rows if r.get("scores")]
    if scores:
        lines += ["", "Prediction scores against the query's true coordinates:", ""]
        lines += [f"- {n:,} {mode}: {s}" for n, mode, s in scores]
    threads = sorted({int(r["torch_threads"]) for r in rows if r.get("torch_threads")})
    lines += [
        "",
        f"Machine: {info.get('cpu', '?')}, {info.get('cpu_count')} cores "
        f"({info.get('cpus_available')} available), {info.get('mem_total_gb')} GB RAM; torch threads "
        f"{', '.join(map(str, threads)) or cfg['threads']}; Python {info['python']}, torch {info['torch']}, "
        f"lightning {info['lightning']}, anndata {info['anndata']}, commit {info.get('commit')}"
        f"{' with uncommitted changes' if info.get('uncommitted_changes') else ''}.",
    ]
    return "\n".join(lines) + "\n"


def figure(rows: list[dict[str, Any]], path: Path) -> Path:
    """Wall seconds, CPU seconds and peak memory against cells, one line per (stage, mode)."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    colours = {s: f"C{i}" for i, s in enumerate(FIGURE_STAGES)}
    styles = {"memory": ("-", "o"), "streaming": ("--", "s")}
    keys = ("seconds", "cpu_seconds", "peak_mb")
    for mode, (ls, marker) in styles.items():
        runs = sorted(
            (r for r in rows if r["mode"] == mode and r["status"] == "ok"), key=lambda r: r["cells"]
        )
        for stage in FIGURE_STAGES:
            kw = {"color": colours[stage], "ls": ls, "marker": marker, "ms": 4}
            for ax, key in zip(axes, keys, strict=True):
                pts = [
                    (r["cells"], r["stages"][stage][key])
                    for r in runs
                    if stage in r["stages"]
                    and r["stages"][stage].get(key) is not None
                    and not math.isnan(r["stages"][stage][key])
                ]
                if not pts:
                    continue
                ys = [p[1] / 1024 if key == "peak_mb" else max(p[1], 1e-2) for p in pts]
                label = f"{stage} ({mode})" if key == "seconds" else None
                ax.plot([p[0] for p in pts], ys, label=label, **kw)
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    labels = ("wall seconds", "CPU seconds (the stage's own process)", "peak RSS (GB)")
    for ax, label in zip(axes, labels, strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(
            plain if label.startswith("peak") else FuncFormatter(lambda v, _: "")
        )
        ax.set_xlabel("reference cells (2000 genes, CSR)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[2].axhline(3, color="grey", lw=0.8, ls=":")
    axes[2].text(axes[2].get_xlim()[0], 3, " 3 GB", va="bottom", fontsize=8, color="grey")
    axes[0].set_title("wall time per stage (solid: memory, dashed: streaming)", fontsize=10)
    axes[1].set_title("CPU time per stage", fontsize=10)
    axes[2].set_title("peak resident memory (with DataLoader workers)", fontsize=10)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.87, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _predicted_peak(rows: list[dict[str, Any]], mode: str, n: int) -> float | None:
    done = sorted(
        (
            (
                r["cells"],
                max(r["process_peak_mb"], r["stages"].get("predict", {}).get("peak_mb", 0)),
            )
            for r in rows
            if r["mode"] == mode and r["status"] == "ok"
        ),
    )
    if not done:
        return None
    if len(done) == 1:
        return done[0][1] * n / done[0][0]  # proportional: an upper bound for a growing peak
    (n0, p0), (n1, p1) = done[-2], done[-1]
    slope = max((p1 - p0) / (n1 - n0), 0.0)
    return p1 + slope * (n - n1)


# ------------------------------------------------------------------------------ the command
def config_from(cfg: DictConfig) -> dict[str, Any]:
    """The plain settings of a composed ``scale.yaml``.

    Raises:
        ConfigError: an unknown mode, a size, epoch or thread count below 1.
    """
    from omegaconf import OmegaConf

    plain: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    plain["cells"] = [int(n) for n in plain["cells"]]
    plain["modes"] = [str(m) for m in plain["modes"]]
    if not plain["cells"] or min(plain["cells"]) < 100:
        raise ConfigError(f"cells must be sizes of at least 100, got {plain['cells']}")
    bad = [m for m in plain["modes"] if m not in MODES]
    if bad or not plain["modes"]:
        raise ConfigError(f"unknown mode {bad[0] if bad else ''!r}; valid: {', '.join(MODES)}")
    for key in ("epochs", "threads", "n_genes"):
        if int(plain[key]) < 1:
            raise ConfigError(f"{key} must be a positive integer, got {plain[key]}")
    plain["train_args"] = [str(a) for a in plain.get("train_args") or []]
    predict = plain.get("predict")
    if isinstance(predict, bool):
        predict = list(plain["modes"]) if predict else []
    plain["predict"] = [str(m) for m in predict or []]
    bad = [m for m in plain["predict"] if m not in MODES]
    if bad:
        raise ConfigError(f"unknown predict mode {bad[0]!r}; valid: {', '.join(MODES)}")
    return plain


def work(cfg: DictConfig) -> int:
    """Every (size, mode) of a composed configuration; writes the results as they come."""
    settings = config_from(cfg)
    out = Path(settings["out"])
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(settings["data_dir"])
    info = machine()
    rows: list[dict[str, Any]] = []

    def save() -> None:
        doc = {"machine": info, "config": settings, "runs": rows, "targets": targets(rows)}
        (out / "results.json").write_text(json.dumps(doc, indent=1, default=str))
        (out / "results.md").write_text(markdown(rows, info, settings))
        png = figure(rows, out / "scale.png")
        if settings.get("figure"):
            dest = Path(settings["figure"])
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.resolve() != Path(png).resolve():
                shutil.copyfile(png, dest)

    if settings["report_only"]:  # redraw the table and figure of an earlier run
        doc = json.loads((out / "results.json").read_text())
        rows[:] = doc["runs"]
        for row in rows:
            if row["status"] == "ok" and "timeline" in row:
                row.setdefault("cells_per_epoch", [row.get("epoch_cells")])
                summarise(row)
        info = doc["machine"]
        save()
        print((out / "results.md").read_text(), flush=True)
        return 0
    for n in sorted(settings["cells"]):
        ref, query = data_files(
            data_dir,
            n,
            settings["n_genes"],
            settings["density"],
            settings["seed"],
            settings["dense"],
        )
        for mode in settings["modes"]:
            guess = _predicted_peak(rows, mode, n)
            if guess is not None and guess > settings["max_rss_gb"] * 1024:
                why = f"skipped: predicted peak {guess / 1024:.1f} GB > max_rss_gb={settings['max_rss_gb']}"
                rows.append({"cells": n, "mode": mode, "status": why})
                print(f"{n:,} {mode}: {why}", flush=True)
                save()
                continue
            print(f"{n:,} {mode}: running", flush=True)
            row = run_one(n, mode, ref, query, settings)
            rows.append(row)
            st = row.get("stages", {})
            summary = ", ".join(
                f"{k} {v['seconds']:.1f} s / {v['peak_mb'] / 1024:.2f} GB" for k, v in st.items()
            )
            print(f"{n:,} {mode}: {row['status']}: {summary}", flush=True)
            save()
    print((out / "results.md").read_text(), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for a usage error)."""
    from dpvae.cli import command

    return command("python -m benchmarks.scale", SUMMARY, CONF_DIR, ROOT_FILE, work)(argv)


if __name__ == "__main__":
    sys.exit(main())
