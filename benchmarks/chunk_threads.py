"""The chunked eager step on worker threads (optforge.chunk_threads) against the same chunks run
one after another on torch's OpenMP threads, on a quiet CPU and beside busy processes.

    python benchmarks/chunk_threads.py [--optimizers adamw,lion,adan] [--load 2] [--rounds 7]

One tensor of --entries float32 entries per optimizer, ``fused=False``; the variants run
interleaved in rounds (medians). ``--load N`` starts N processes that spin on the CPU for the
whole run (stopped at exit), as other jobs on a shared machine would.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

import torch

import optforge
from optforge import chunk_threads, eager_chunks


def _spin() -> None:
    while True:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optimizers", default="adamw,lion,adan,adopt")
    ap.add_argument("--entries", type=int, default=1 << 24)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--load", type=int, default=0, help="busy processes beside the run")
    ap.add_argument("--state-precision", help="low-bit state (int8, int4, ...; the low-bit eager step)")
    args = ap.parse_args(argv)
    if args.load < 0 or args.entries <= eager_chunks.CHUNK:
        ap.error(f"--load must be >= 0 and --entries > {eager_chunks.CHUNK} "
                 f"(got {args.load} and {args.entries})")
    torch.set_num_threads(args.threads)
    spinners = [mp.Process(target=_spin, daemon=True) for _ in range(args.load)]
    for s in spinners:
        s.start()
    try:
        run(args)
    finally:
        for s in spinners:
            s.terminate()
    return 0


def run(args: argparse.Namespace) -> None:
    variants = {"openmp": 1, "threads": chunk_threads.MAX_WORKERS}
    opts = {}
    for name in args.optimizers.split(","):
        p = torch.nn.Parameter(torch.randn(args.entries))
        p.grad = torch.randn(args.entries) * 1e-3
        opts[name] = optforge.get_optimizer_info(name).cls([p], fused=False)
        if args.state_precision:
            opts[name].configure(state_precision=args.state_precision)
        opts[name].step()
    times: dict[tuple[str, str], list[float]] = {(n, v): [] for n in opts for v in variants}
    saved = chunk_threads.MAX_WORKERS, chunk_threads.STEP_THREADS
    chunk_threads.STEP_THREADS = True
    try:
        for _ in range(args.rounds):
            for name, opt in opts.items():
                for variant, max_workers in variants.items():
                    chunk_threads.MAX_WORKERS = max_workers
                    start = time.perf_counter()
                    opt.step()
                    times[name, variant].append(time.perf_counter() - start)
    finally:
        chunk_threads.MAX_WORKERS, chunk_threads.STEP_THREADS = saved
    print(f"{args.entries:,d} entries, state {args.state_precision or 'float32'}, {args.threads} threads, "
          f"--load {args.load}, "
          f"load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}")
    print("| optimizer | chunks on OpenMP, ms | chunks on threads, ms | threads / OpenMP |")
    print("|---|---|---|---|")
    for name in opts:
        a, b = (statistics.median(times[name, v]) * 1e3 for v in variants)
        print(f"| {name} | {a:.1f} | {b:.1f} | {b / a:.2f} |")


if __name__ == "__main__":
    raise SystemExit(main())
