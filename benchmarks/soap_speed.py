#!/usr/bin/env python
"""SOAP's first step against its steady steps, beside pytorch_optimizer's and heavyball's SOAP,
measured in one run, optionally with busy-looping processes competing for the cores.

SOAP's first step only builds the preconditioner: one eigendecomposition (``eigh``) per
Shampoo factor, of factors that are rank-deficient when a matrix is wider than tall. Later
steps rotate the gradient into the eigenbases (matmuls); every ``precondition_frequency``
steps a step also refreshes the bases (a power iteration and a QR per factor).

float32, CPU, fixed random gradients (three sets, used in turn, so the factors fill up);
only ``opt.step()`` is timed. Each round builds every entry afresh (entries in turn, one
entry later each round) and times its first step, then one period of
``precondition_frequency`` steps, the last of which refreshes the eigenbases. Reported:
the first step (median and slowest over rounds), the steady step (median of the steps that
do not refresh), the refreshing step (median), the mean over the period (the first step
left out, the refresh in) and first / steady. ``cold first`` is the first step of an untimed
warm-up instance built before the rounds: the first SOAP step of the process (library and
LAPACK initialisation, compilation for heavyball with ``--heavyball-compile``).

Every entry runs at the same hyperparameters: lr 3e-3, betas (0.95, 0.95), shampoo_beta
0.95, eps 1e-8, weight decay 0.01, precondition_frequency 10, max_precond_dim 10000, no
dim merging, 1-D params as plain Adam (optforge's and pytorch_optimizer's defaults but
shampoo_beta, which they take from betas[1] = 0.95 too; heavyball's defaults differ: betas
(0.9, 0.95), precondition_frequency 2, max_precond_dim 2048, merge_dims True, all set here).
heavyball's SOAP is not the same algorithm to the digit (it bias-corrects shampoo_beta), and
by default it compiles its kernels with torch.compile (max-autotune): minutes on a CPU, so
here it runs eager unless ``--heavyball-compile``.

    python benchmarks/soap_speed.py                              # four-256x768, 5-small-blocks
    python benchmarks/soap_speed.py --workloads four-256x768 --load 2 --rounds 3
    python benchmarks/soap_speed.py --threads 1 --rounds 5
    # against another version, interleaved in the same run:
    git archive COMMIT src/optforge | tar -x -C /tmp/old && mv /tmp/old/src/optforge /tmp/old/optforge_before
    python benchmarks/soap_speed.py --before /tmp/old
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime
import importlib
import importlib.metadata
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from step_speed import THREADS, WORKLOADS, cpu_name, loadavg, transformer_shapes

import optforge

HPARAMS = dict(lr=3e-3, betas=(0.95, 0.95), shampoo_beta=0.95, eps=1e-8, weight_decay=0.01)
MAX_PRECOND_DIM = 10000
GRAD_SETS = 3
SHAPES = {
    "four-256x768": [(256, 768)] * 4 + [(256,)] * 4,           # four linear layers, weights and biases
    "many-small": list(WORKLOADS["many-small"].shapes),        # 25 transformer blocks, d=128, ff=512
    "5-small-blocks": transformer_shapes(128, 512, blocks=5),  # its first 5 blocks: a shorter run
    "many-tiny": list(WORKLOADS["many-tiny"].shapes),          # the same, d=8, ff=32
}

# A spinner exits by itself once its parent is gone (it is re-parented), so none outlives the run.
SPIN = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    pass\n"


@contextlib.contextmanager
def busy_loops(n: int) -> Iterator[None]:
    """``n`` background processes busy-looping on the CPU while the block runs; stopped when
    it ends, on error or when the run is interrupted (SIGTERM too)."""
    procs = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(n)]

    def stop() -> None:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    atexit.register(stop)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143)) if n else None
    try:
        yield
    finally:
        stop()
        if n:
            signal.signal(signal.SIGTERM, previous)


@dataclass
class Entry:
    """A SOAP to time: ``make`` builds it on params; ``refreshed(opt, k)`` says whether its
    ``k``-th step (1-based) recomputed the eigenbases."""

    name: str
    make: Callable[[list[torch.Tensor]], Any]
    refreshed: Callable[[Any, int], bool]
    cold_first: float = math.nan
    first: list[float] = field(default_factory=list)
    steady: list[float] = field(default_factory=list)
    refresh: list[float] = field(default_factory=list)
    period_mean: list[float] = field(default_factory=list)


def every(freq: int) -> Callable[[Any, int], bool]:
    """optforge and pytorch_optimizer refresh when the steps after the first are a multiple of freq."""
    return lambda opt, k: k > 1 and (k - 1) % freq == 0


def entries(freq: int, heavyball_compile: bool, before: str | None) -> tuple[list[Entry], dict[str, str]]:
    out = [Entry("optforge.SOAP", lambda ps: optforge.SOAP(
        ps, **HPARAMS, precondition_frequency=freq, max_precond_dim=MAX_PRECOND_DIM), every(freq))]
    if before is not None:                   # another optforge version, as package optforge_before
        sys.path.insert(0, before)
        older = importlib.import_module("optforge_before")
        out.append(Entry("before.SOAP", lambda ps: older.SOAP(
            ps, **HPARAMS, precondition_frequency=freq, max_precond_dim=MAX_PRECOND_DIM), every(freq)))
    missing: dict[str, str] = {}
    try:
        from pytorch_optimizer import SOAP as PeerSOAP
        out.append(Entry("pytorch_optimizer.SOAP", lambda ps: PeerSOAP(
            ps, **HPARAMS, precondition_frequency=freq, max_precondition_dim=MAX_PRECOND_DIM), every(freq)))
    except ImportError as e:
        missing["pytorch_optimizer.SOAP"] = str(e)
    try:
        import heavyball
        if not heavyball_compile:
            heavyball.utils.compile_mode = None
            heavyball.utils.compile_mode_recommended_to_none = None
        out.append(Entry("heavyball.SOAP", lambda ps: heavyball.SOAP(
            ps, **HPARAMS, precondition_frequency=freq, max_precond_dim=MAX_PRECOND_DIM, merge_dims=False,
            precondition_1d=False), lambda opt, k: bool(opt._is_preconditioning)))
    except Exception as e:               # not installed, or its import fails on this setup
        missing["heavyball.SOAP"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
    return out, missing


def run_once(entry: Entry, shapes: list[tuple[int, ...]], grads: list[list[torch.Tensor]],
             freq: int) -> tuple[float, list[tuple[float, bool]]]:
    """A fresh optimizer: its first step's seconds, then (seconds, refreshed) for one period."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    opt = entry.make(params)
    first, rest = math.nan, []
    for k in range(1, freq + 2):
        for p, g in zip(params, grads[(k - 1) % len(grads)]):
            p.grad = g.clone()               # untimed; heavyball drops p.grad after its step
        start = time.perf_counter()
        opt.step()
        seconds = time.perf_counter() - start
        if k == 1:
            first = seconds
        else:
            rest.append((seconds, entry.refreshed(opt, k)))
    return first, rest


def measure(entries_: list[Entry], shapes: list[tuple[int, ...]], rounds: int, freq: int) -> None:
    grads = []
    for s in range(GRAD_SETS):
        gen = torch.Generator().manual_seed(1 + s)
        grads.append([torch.randn(shape, generator=gen) for shape in shapes])
    for e in entries_:                        # untimed warm-up: the process's first SOAP step
        e.cold_first, _ = run_once(e, shapes, grads, freq)
    for r in range(rounds):
        for e in entries_[r % len(entries_):] + entries_[:r % len(entries_)]:
            first, rest = run_once(e, shapes, grads, freq)
            e.first.append(first)
            e.steady += [t for t, refreshed in rest if not refreshed]
            e.refresh += [t for t, refreshed in rest if refreshed]
            e.period_mean.append(statistics.mean(t for t, _ in rest))


def ms(xs: list[float]) -> str:
    return f"{1e3 * statistics.median(xs):9.1f}" if xs else f"{'-':>9}"


def report(name: str, shapes: list[tuple[int, ...]], es: list[Entry], args: argparse.Namespace) -> None:
    n_params = sum(math.prod(s) for s in shapes)
    matrices = sum(len(s) >= 2 for s in shapes)
    print(f"\nworkload {name}: {len(shapes)} tensors ({matrices} matrices), {n_params:,} params; "
          f"{args.rounds} rounds, a period of {args.precondition_frequency} steps each")
    print(f"  {'entry':24s} {'cold first':>10s} {'first':>9s} {'slowest':>9s} {'steady':>9s} {'refresh':>9s} "
          f"{'period':>9s}   first/steady  slowest/steady")
    med = statistics.median
    for e in es:
        steady = med(e.steady)
        print(f"  {e.name:24s} {1e3 * e.cold_first:10.1f} {ms(e.first)} {1e3 * max(e.first):9.1f} "
              f"{ms(e.steady)} {ms(e.refresh)} {ms(e.period_mean)}   {med(e.first) / steady:12.2f} "
              f"{max(e.first) / steady:15.2f}")
    mine = es[0]
    for peer in es[1:]:
        print(f"  optforge / {peer.name}: first {med(mine.first) / med(peer.first):.2f}, "
              f"steady {med(mine.steady) / med(peer.steady):.2f}, "
              f"period mean {med(mine.period_mean) / med(peer.period_mean):.2f}")


def version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="four-256x768,5-small-blocks",
                        help="comma list of: " + ", ".join(SHAPES) + " (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precondition-frequency", type=int, default=10)
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads (default: %(default)s)")
    parser.add_argument("--load", type=int, default=0, metavar="N",
                        help="start N busy-looping processes for the run (stopped at its end)")
    parser.add_argument("--heavyball-compile", action="store_true",
                        help="let heavyball compile its kernels (its default; minutes on a CPU)")
    parser.add_argument("--before", metavar="DIR",
                        help="also time the SOAP of another optforge version: DIR holds its "
                             "src/optforge renamed to optforge_before (see the module docstring)")
    parser.add_argument("--no-peers", action="store_true", help="leave out pytorch_optimizer and heavyball")
    args = parser.parse_args()
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in names if w not in SHAPES]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; choose from {', '.join(SHAPES)}")
    if args.rounds < 1 or args.precondition_frequency < 2 or args.load < 0 or args.threads < 1:
        parser.error("--rounds and --threads must be >= 1, --precondition-frequency >= 2, --load >= 0")
    torch.set_num_threads(args.threads)
    es, missing = entries(args.precondition_frequency, args.heavyball_compile, args.before)
    if args.no_peers:
        es, missing = [e for e in es if not e.name.startswith(("pytorch_optimizer", "heavyball"))], {}
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu_name()}, "
          f"{os.cpu_count()} cores; load average {loadavg():.2f} before the run; "
          f"{args.threads} torch thread(s); {args.load} busy-looping process(es) added")
    print(f"torch {torch.__version__}, optforge {getattr(optforge, '__version__', '?')}, "
          f"pytorch_optimizer {version('pytorch_optimizer')}, heavyball {version('heavyball')}"
          + (" (compiled)" if args.heavyball_compile else " (eager)"))
    for name, why in missing.items():
        print(f"  {name} left out: {why}")
    with busy_loops(args.load):
        for name in names:
            for e in es:
                e.first, e.steady, e.refresh, e.period_mean = [], [], [], []
            measure(es, SHAPES[name], args.rounds, args.precondition_frequency)
            report(name, SHAPES[name], es, args)
    print(f"\nload average {loadavg():.2f} at the end (the added processes included)")


if __name__ == "__main__":
    main()
