"""What a stopping rule would have given: one fixed-schedule fit per (unit, seed), the query scored
at every spatial validation, every candidate rule replayed on those numbers.

    python -m benchmarks.stopping data_dir=../shared/data seeds=0,1,2 datasets=all out=bench_out/stop
    python -m benchmarks.stopping replay=[bench_out/stop_A,bench_out/stop_B] out=bench_out/stop

Keys: ``benchmarks/conf/stopping.yaml`` (``--help``). Each impute and transfer unit of the
protocol (its splits and hygiene) is fit once through :func:`dpvae.pipeline.train` with the fixed
schedule (``trainer.max_epochs``, 60) and the stopping rule off. At every epoch :class:`dpvae.callbacks.SpatialValidation` scores (every 5th) the
weights are copied; after the fit each copy places the unit's query as
:func:`dpvae.api.fit_predict` does and the protocol scores it. Training draws the same random
numbers whether or not a rule stops it (no learning-rate schedule; the stopping callback draws
nothing), so a rule that stops after epoch ``e`` yields exactly the copy of epoch ``e``: every rule
is replayed from one run on the same numbers.

Writes ``OUT/trace.csv`` (a row per unit, seed and validated epoch: the validation scores a rule
sees, the query's dist_pearson, seconds since the fit began) and ``OUT/rules.md`` (per rule: mean
dist_pearson per unit beside the fixed schedule's, the worst change, the epochs and the share of
the fixed schedule's seconds).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

RULES_FILE = "rules.md"
TRACE_FILE = "trace.csv"


def _tracer() -> Any:
    import lightning as L

    from dpvae.callbacks import SpatialValidation

    class Trace(L.Callback):
        """Copy the weights and the logged scalars at every epoch SpatialValidation scored."""

        def __init__(self) -> None:
            self.snapshots: list[tuple[int, float, dict[str, float], dict[str, Any]]] = []

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            self.t0 = time.perf_counter()

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            if trainer.sanity_checking or SpatialValidation.placed_now(trainer) is None:
                return
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
            state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            seconds = time.perf_counter() - self.t0
            self.snapshots.append((trainer.current_epoch + 1, seconds, metrics, state))

    return Trace()


def trace_unit(
    ref_in: Any,
    query_in: Any,
    task: str,
    seed: int,
    T: np.ndarray,
    ref_coords: np.ndarray,
    overrides: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Fit once with the fixed schedule; score the query with the weights of every validated
    epoch (as :func:`dpvae.api.fit_predict` places it)."""
    from benchmarks.protocol import _score
    from dpvae import pipeline
    from dpvae.api import Model, _quiet_lightning
    from dpvae.config import load_config
    from dpvae.placement import embed_reference

    cfg = load_config(
        [
            "logger=none",
            "data.reference=<AnnData in memory>",
            f"seed={seed}",
            *overrides,
        ]
    )
    # the fixed schedule, whatever the overrides
    if cfg.callbacks.get("early_stopping") is not None:
        cfg.callbacks.early_stopping.monitor = None
    tracer = _tracer()
    t0 = time.perf_counter()
    with _quiet_lightning(False):
        done = pipeline.train(cfg, reference=ref_in, extra_callbacks=[tracer])
    fit_s = time.perf_counter() - t0
    if not tracer.snapshots:
        from dpvae.errors import DataError

        raise DataError(
            "no epoch was scored: the trace needs validation cells (data.val_fraction > 0) "
            "and callbacks.spatial"
        )
    module = done.model.cpu().eval()
    rows = []
    for epoch, seconds, metrics, state in tracer.snapshots:
        module.load_state_dict(state)
        model = Model(module, embed_reference(module, done.data))
        P = model.predict(query_in, align_query=task == "transfer")
        score = _score("dpvae", task, np.asarray(P, dtype=np.float64), T, ref_coords)
        rows.append(
            {
                "epoch": epoch,
                "seconds": seconds,
                "fit_s": fit_s,
                "dist_pearson": score["dist_pearson"],
                **{k.replace("/", "_"): v for k, v in metrics.items()},
            }
        )
    return rows


def trace(cfg: Any, log: Any = print) -> pd.DataFrame:
    """Trace every impute and transfer unit and seed of the protocol configuration ``cfg``."""
    import anndata as ad

    from benchmarks.protocol import hygiene, hygiene_pair, impute_split, method_inputs

    rows = []
    units: list[tuple[str, Any]] = [("impute", u) for u in cfg.impute_units]
    units += [("transfer", u) for u in cfg.transfer_units]
    cfg.out.mkdir(parents=True, exist_ok=True)
    for task, unit in units:
        if task == "impute":
            full = hygiene(ad.read_h5ad(cfg.files[unit]), unit)
            name = unit
        else:
            a, b = unit
            pair = hygiene_pair(ad.read_h5ad(cfg.files[a]), ad.read_h5ad(cfg.files[b]), (a, b))
            name = f"{a}->{b}"
        for seed in cfg.seeds:
            if task == "impute":
                ri, qi = impute_split(full.n_obs, seed)
                ref_sec, query_sec = full[ri], full[qi]
            else:
                ref_sec, query_sec = pair
            ref_in, query_in = method_inputs(ref_sec, query_sec)
            T = np.asarray(query_sec.obsm["spatial"], dtype=np.float64)
            ref_coords = np.asarray(ref_sec.obsm["spatial"], dtype=np.float64)
            overrides = (f"threads={cfg.threads}", *cfg.dpvae_overrides)
            got = trace_unit(ref_in, query_in, task, seed, T, ref_coords, overrides)
            for row in got:
                rows.append({"task": task, "unit": name, "seed": seed, **row})
            last = got[-1]
            log(
                f"[{task}] {name} seed={seed}: {len(got)} epochs scored, fixed schedule "
                f"dist_pearson={last['dist_pearson']:.3f} ({last['fit_s']:.1f} s)"
            )
            pd.DataFrame(rows).to_csv(cfg.out / TRACE_FILE, index=False)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Rules replayed on a trace
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """Stop once ``monitor`` (``max``: higher is better) has not improved by more than
    ``min_delta`` over the best so far for ``patience`` validations after the warm-up (whose
    epochs never count); ``best`` keeps the best validated epoch's weights, else the last;
    ``min_epochs``: a stop decided earlier waits for that epoch (Lightning's ``min_epochs``)."""

    monitor: str = "val_loss"
    mode: str = "min"
    patience: int = 2
    min_delta: float = 0.0
    warmup: int = 10
    best: bool = False
    min_epochs: int = 0
    every: int = 5

    @property
    def name(self) -> str:
        keep = "best" if self.best else "last"
        return (
            f"{self.monitor.removeprefix('val_')} {self.mode} patience={self.patience} "
            f"min_delta={self.min_delta:g} keep={keep} min_epochs={self.min_epochs}"
        )

    def stop(self, values: Sequence[float], epochs: Sequence[int]) -> tuple[int, int]:
        """``(index stopped at, index of the weights kept)`` along one run's validations (the
        epochs that are multiples of ``every``), by the rules of Lightning's ``EarlyStopping``
        (an improvement beats the best by more than ``min_delta``; ``patience`` checks without
        one, or a non-finite value, decide the stop, which then holds until ``min_epochs``) and
        of :class:`dpvae.callbacks.BestWeights` (the highest value kept, among these epochs:
        a run monitoring a placement score for its best weights places cells every epoch)."""
        sign = 1.0 if self.mode == "max" else -1.0
        best, waited, decided = -math.inf, 0, False
        kept, kept_value = -1, -math.inf
        for i, (value, epoch) in enumerate(zip(values, epochs, strict=True)):
            if epoch % self.every:
                continue
            v = sign * value
            if v > kept_value:  # BestWeights sees every validation, the warm-up's too
                kept, kept_value = i, v
            if epoch <= self.warmup:
                continue
            if not decided:
                if not math.isfinite(v):
                    decided = True
                elif v - self.min_delta > best:
                    best, waited = v, 0
                else:
                    waited += 1
                    decided = waited >= self.patience
            if decided and epoch >= self.min_epochs:
                return i, kept if self.best else i
        last = len(values) - 1
        return last, kept if self.best else last


def replay(trace: pd.DataFrame, rules: Sequence[Rule]) -> pd.DataFrame:
    """Per rule and unit: mean dist_pearson at the stop and of the fixed schedule, mean epochs and
    share of the fixed schedule's seconds."""
    out = []
    for (task, unit), unit_rows in trace.groupby(["task", "unit"], sort=False):
        for rule in rules:
            scores, fixed, epochs, share = [], [], [], []
            for _, run in unit_rows.groupby("seed"):
                run = run.sort_values("epoch")
                stop_i, keep_i = rule.stop(list(run[rule.monitor]), list(run["epoch"]))
                scores.append(float(run["dist_pearson"].iloc[keep_i]))
                fixed.append(float(run["dist_pearson"].iloc[-1]))
                epochs.append(int(run["epoch"].iloc[stop_i]))
                share.append(float(run["seconds"].iloc[stop_i] / run["seconds"].iloc[-1]))
            out.append(
                {
                    "rule": rule.name,
                    "task": task,
                    "unit": unit,
                    "fixed": float(np.mean(fixed)),
                    "stopped": float(np.mean(scores)),
                    "change": float(np.mean(scores) - np.mean(fixed)),
                    "epochs": float(np.mean(epochs)),
                    "time_share": float(np.mean(share)),
                }
            )
    return pd.DataFrame(out)


def candidate_rules(warmup: int = 10) -> list[Rule]:
    """Rules on the held-out cells' placement score (every validation) and on the validation loss."""
    rules = []
    for patience in (1, 2, 3, 4):
        for min_delta in (0.0, 0.005):
            for min_epochs in (0, 20, 30):
                for best in (False, True):
                    rules.append(
                        Rule(
                            "val_dist_pearson", "max", patience, min_delta, warmup, best, min_epochs
                        )
                    )
    for patience in (1, 2, 3):
        rules.append(Rule("val_loss", "min", patience, 0.0, warmup))
    return rules


def default_rule() -> Rule | None:
    """The rule ``conf/train.yaml`` configures (``None`` when it is off)."""
    from dpvae.config import load_config

    cfg = load_config([])
    spec = cfg.callbacks.early_stopping
    if not spec or not spec.get("monitor"):
        return None
    return Rule(
        str(spec.monitor).replace("/", "_"),
        str(spec.mode),
        int(spec.patience),
        float(spec.min_delta),
        int(cfg.model.warmup_epochs),
        every=int(spec.every_n_epochs),
    )


def write_rules(table: pd.DataFrame, path: Path) -> None:
    """``rules.md``: one line per rule (worst unit change, mean change, mean time share), then
    each rule's units."""
    lines = ["# Stopping rules replayed on the fixed schedule's trace", ""]
    lines += [
        "| rule | worst change | mean change | units worse by > 0.01 | mean epochs | mean time |",
        "|---|---|---|---|---|---|",
    ]
    summary = []
    for rule, rows in table.groupby("rule", sort=False):
        summary.append(
            (
                rule,
                rows["change"].min(),
                rows["change"].mean(),
                int((rows["change"] < -0.01).sum()),
                rows["epochs"].mean(),
                rows["time_share"].mean(),
            )
        )
    chosen = default_rule()
    for rule, worst, mean, bad, epochs, share in sorted(summary, key=lambda s: -s[1]):
        mark = " (the default)" if chosen is not None and rule == chosen.name else ""
        lines.append(
            f"| {rule}{mark} | {worst:+.4f} | {mean:+.4f} | {bad} | {epochs:.1f} | {share:.0%} |"
        )
    lines.append("")
    for rule, rows in table.groupby("rule", sort=False):
        lines += [f"## {rule}", "", "| task | unit | fixed | stopped | change | epochs | time |"]
        lines.append("|---|---|---|---|---|---|---|")
        for _, r in rows.iterrows():
            lines.append(
                f"| {r.task} | {r.unit} | {r.fixed:.3f} | {r.stopped:.3f} | {r.change:+.4f} "
                f"| {r.epochs:.1f} | {r.time_share:.0%} |"
            )
        lines.append("")
    path.write_text("\n".join(lines))


SUMMARY = """
Fit each impute and transfer unit of the dev benchmark once with the fixed schedule, score its query
at every placement of the validation cells, and replay every candidate stopping rule on those
numbers (OUT/trace.csv, OUT/rules.md). replay=[DIR,...] re-reads earlier traces instead.
"""
CONF_DIR = Path(__file__).resolve().parent / "conf"
ROOT_FILE = "stopping.yaml"


def work(cfg: Any) -> int:
    """Trace (or replay) and write the rules' table; returns the exit status."""
    from omegaconf import OmegaConf

    from benchmarks.protocol import compose, config_from
    from dpvae.errors import ConfigError

    out = Path(str(cfg.out)).expanduser()
    sources = [Path(str(s)).expanduser() for s in cfg.replay]
    if sources:
        missing = [s for s in sources if not (s / TRACE_FILE).is_file()]
        if missing:
            raise ConfigError(f"replay: no {TRACE_FILE} in {missing[0]}; give folders of traces")
        table = pd.concat([pd.read_csv(s / TRACE_FILE) for s in sources], ignore_index=True)
    else:
        plain = OmegaConf.to_container(cfg)
        assert isinstance(plain, dict)
        plain.pop("replay")
        plain["methods"] = ["dpvae"]
        bench = config_from(OmegaConf.merge(compose([]), plain))
        if bench.anchored_units:
            raise ConfigError("tasks: the stopping trace runs impute and transfer only")
        table = trace(bench, log=lambda s: print(s, flush=True))
    out.mkdir(parents=True, exist_ok=True)
    write_rules(replay(table, candidate_rules()), out / RULES_FILE)
    print(f"wrote {out / RULES_FILE}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for a usage or data error)."""
    from dpvae.cli import command

    return command("python -m benchmarks.stopping", SUMMARY, CONF_DIR, ROOT_FILE, work)(argv)


if __name__ == "__main__":
    raise SystemExit(main())
