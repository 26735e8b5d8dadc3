"""Time and memory of the coordinate solver as the number of cells grows.

``python -m dpvae.bench_solver task=impute n=10000,100000,1000000 [threads=1]``
``python -m dpvae.bench_solver task=reconstruct n=10000,100000,1000000``

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

import torch

from dpvae.errors import DPVAEError


def _latent(n: int, gen: torch.Generator, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(n, 2, generator=gen) * 100.0
    return x, x @ basis.T + 0.05 * torch.randn(n, basis.shape[0], generator=gen)


def _one(task: str, n: int, threads: int, queue: mp.Queue) -> None:
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


def main(argv: list[str] | None = None) -> int:
    """Entry point; prints a Markdown table."""
    args = dict(a.split("=", 1) for a in (sys.argv[1:] if argv is None else argv) if "=" in a)
    try:
        task = args.get("task", "impute")
        if task not in ("impute", "reconstruct"):
            raise DPVAEError(f"task must be impute or reconstruct, got {task!r}")
        sizes = [int(float(s)) for s in args.get("n", "10000,100000,1000000").split(",")]
        threads = int(args.get("threads", "1"))
    except (ValueError, DPVAEError) as exc:
        print(f"dpvae: error: {exc}", file=sys.stderr)
        return 2
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


if __name__ == "__main__":
    sys.exit(main())
