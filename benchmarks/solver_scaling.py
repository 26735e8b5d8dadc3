"""Time and memory of the coordinate solver as the number of cells grows.

Run from the repository root of a checkout (keys and defaults: ``benchmarks/conf/solver_scaling.yaml``,
``--help`` prints them)::

    python -m benchmarks.solver_scaling task=impute n=10000,100000,1000000 threads=1
    python -m benchmarks.solver_scaling task=reconstruct n=10000,100000,1000000

Synthetic cells in a 100 x 100 square (unit density ~1 cell per unit at 10k), latent codes = an
orthonormal map of the coordinates into 16 dimensions plus Gaussian noise 0.05; ``impute`` places
``n`` query cells against a 10k-cell reference (k = 10), ``reconstruct`` solves all ``n`` cells with
3000 landmarks. Each size runs in a fresh process so peak memory is its own. Prints one Markdown
row per size: seconds of the solver call, peak resident memory, and accuracy (median placement
error in coordinate units; relative error after the best rigid motion for reconstruct).
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from dpvae.errors import ConfigError

if TYPE_CHECKING:
    import torch


def _latent(n: int, gen: torch.Generator, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    x = torch.rand(n, 2, generator=gen) * 100.0
    return x, x @ basis.T + 0.05 * torch.randn(n, basis.shape[0], generator=gen)


def _one(task: str, n: int, threads: int, queue: mp.Queue) -> None:
    import torch

    from dpvae.solver import impute, reconstruct

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(16, 2, generator=gen))
    if task == "impute":
        x_ref, z_ref = _latent(10_000, gen, basis)
        x, z = _latent(n, gen, basis)
        start = time.perf_counter()
        out = impute(z, z_ref, x_ref, k=10)
        seconds = time.perf_counter() - start
        accuracy = float((out - x).norm(dim=1).median())
    else:
        x, z = _latent(n, gen, basis)
        start = time.perf_counter()
        out = reconstruct(z, 2, landmarks=3000)
        seconds = time.perf_counter() - start
        xc, oc = x.double() - x.double().mean(0), out.double() - out.double().mean(0)
        u, _, vt = torch.linalg.svd(oc.T @ xc)
        accuracy = float((oc @ (u @ vt) - xc).norm() / xc.norm())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put((seconds, peak_mb, accuracy))


TASKS = ("impute", "reconstruct")
CONF_DIR = Path(__file__).resolve().parent / "conf"
ROOT_FILE = "solver_scaling.yaml"
SUMMARY = """
Time, peak memory and accuracy of dpvae's coordinate solver on synthetic cells as their number
grows: task=impute places n query cells against a 10k-cell reference, task=reconstruct solves all n
cells through 3000 landmarks. Each size runs in a fresh process; prints one Markdown row per size.
"""


def config_from(cfg: DictConfig) -> tuple[str, list[int], int]:
    """(task, sizes, threads) of a composed ``solver_scaling.yaml`` configuration.

    Raises:
        ConfigError: a key ``+key=`` added, an unknown task, a size or thread count below 1.
    """
    from omegaconf import OmegaConf

    known = [str(k) for k in OmegaConf.load(CONF_DIR / ROOT_FILE)]
    extra = [str(k) for k in cfg if str(k) not in known]
    if extra:
        raise ConfigError(f"unknown key {extra[0]!r}; valid keys: {', '.join(known)}")
    if cfg.task not in TASKS:
        raise ConfigError(f"unknown task {cfg.task!r}; valid: {', '.join(TASKS)}")
    sizes = list(cfg.n)
    if not sizes or any(n < 1 for n in sizes):
        raise ConfigError(f"n must be positive integers, got {sizes}")
    if cfg.threads < 1:
        raise ConfigError(f"threads must be a positive integer, got {cfg.threads}")
    return str(cfg.task), sizes, int(cfg.threads)


def work(cfg: DictConfig) -> int:
    """Run every size of a composed configuration; prints a Markdown table."""
    task, sizes, threads = config_from(cfg)
    accuracy = "median error" if task == "impute" else "rel. rigid error"
    print(f"| task | cells | solver s | peak RSS MB | {accuracy} |\n|---|---|---|---|---|")
    ctx = mp.get_context("spawn")
    for n in sizes:
        queue = ctx.Queue()
        proc = ctx.Process(target=_one, args=(task, n, threads, queue))
        proc.start()
        seconds, peak, acc = queue.get()
        proc.join()
        print(f"| {task} | {n:,} | {seconds:.1f} | {peak:.0f} | {acc:.3g} |", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for a usage or data error)."""
    from dpvae.cli import command

    return command("python -m benchmarks.solver_scaling", SUMMARY, CONF_DIR, ROOT_FILE, work)(argv)


if __name__ == "__main__":
    sys.exit(main())
