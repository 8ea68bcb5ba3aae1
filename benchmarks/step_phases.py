"""Where the time of a generated fused step goes outside its kernel, phase by phase, and what
single torch calls cost once the caches no longer hold their code and data.

1. ``Lion(fused=True)`` on ``--tensors`` tensors of ``--numel`` entries (default 2,000 x 2,500,
   as ``step_overhead.py``'s split), steps back to back: a clock reading at the start and end
   of each phase (torch's step wrapper, the kept plan's checks, the gradient copy, the per-step
   scalars, the compiled kernel, the step-count update, ...), median microseconds over the
   steps. Each step starts after the previous one streamed about 100 MB through the caches.
2. A few calls every optimizer step makes (torch's ``record_function``, which wraps every
   ``Optimizer.step``; ``no_grad``; a 0-d ``add_``; ``torch.tensor`` of 3 numbers), each timed
   alone back to back (warm) and right after a 128 MB copy (cold), median microseconds.

    python benchmarks/step_phases.py            # about 20 s
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import ExitStack
from unittest import mock

import torch
from step_overhead import make

import optforge as of
from optforge import base, step_plan
from optforge import fused as fused_module

# (object, attribute, phase name) of the calls whose start and end are stamped
STAMPED = [
    (base.Optimizer, "_step", "optforge's step"),
    (step_plan, "plan_for", "plans of the groups"),
    (step_plan.Plan, "buckets", "kept plan: checks, gradients, state columns"),
    (fused_module.FlatBucket, "gather_grads", "gradient copy into the flat buffer"),
    (fused_module, "_kernel_scalars", "per-step scalars as 0-d tensors"),
    (fused_module.FlatBucket, "advance_step", "step counts + 1"),
    (step_plan, "release", "letting go of the gradients"),
]


def phase_split(n: int, numel: int, steps: int) -> None:
    _params, opt = make(n, numel, lambda ps: of.Lion(ps, fused=True))
    stamps: list[tuple[str, float]] = []

    def stamped(fn, name):
        def run(*args, **kwargs):
            stamps.append((f"{name} >", time.perf_counter()))
            out = fn(*args, **kwargs)
            stamps.append((f"{name} <", time.perf_counter()))
            return out
        return run

    compiled = fused_module.compiled_step
    with ExitStack() as patches:
        for owner, attr, name in STAMPED:
            patches.enter_context(mock.patch.object(owner, attr, stamped(getattr(owner, attr), name)))
        patches.enter_context(mock.patch.object(
            fused_module, "compiled_step",
            lambda *a, **k: stamped(compiled(*a, **k), "compiled kernel")))
        gaps: dict[tuple[str, str], list[float]] = {}
        for _ in range(steps):
            stamps.clear()
            stamps.append(("opt.step() >", time.perf_counter()))
            opt.step()
            stamps.append(("opt.step() <", time.perf_counter()))
            for (a, ta), (b, tb) in zip(stamps, stamps[1:]):
                gaps.setdefault((a, b), []).append(tb - ta)
    print(f"== Lion(fused=True), {n} tensors x {numel} entries, steps back to back: median us from "
          f"one stamp to the next ({steps} steps) ==")
    total = 0.0
    for (a, b), ts in gaps.items():
        us = statistics.median(ts) * 1e6
        total += us
        inside = a.endswith(">") and b == a[:-1] + "<"
        print(f"  {(a[:-2] if inside else f'  between: {a} .. {b}'):96s} {us:9.1f}")
    print(f"  {'sum of the medians':96s} {total:9.1f}")
    kernel = statistics.median(gaps[("compiled kernel >", "compiled kernel <")]) * 1e6
    copy = statistics.median(gaps[("gradient copy into the flat buffer >",
                                   "gradient copy into the flat buffer <")]) * 1e6
    print(f"  the rest (the sum less the kernel and the copy): {total - kernel - copy:.0f} us, "
          f"{(total - kernel - copy) / kernel:.2f}x the kernel")


def cold_calls(rounds: int) -> None:
    evict, source = torch.empty(32 << 20), torch.randn(32 << 20)
    x = torch.zeros(4)

    def record_function():
        with torch.autograd.profiler.record_function("Optimizer.step#Lion.step"):
            pass

    def no_grad():
        with torch.no_grad():
            pass

    calls = {"a Python function that does nothing": lambda: None,
             "record_function (enter + exit)": record_function,
             "torch.no_grad() (enter + exit)": no_grad,
             "x.add_(1), 4 entries": lambda: x.add_(1),
             "torch.tensor([1.0, 2.0, 3.0])": lambda: torch.tensor([1.0, 2.0, 3.0])}
    print(f"\n== single calls, median us of {rounds}: warm (back to back) / cold (after a 128 MB copy) ==")
    for name, call in calls.items():
        out = []
        for cold in (False, True):
            ts = []
            for _ in range(rounds):
                if cold:
                    evict.copy_(source)
                start = time.perf_counter()
                call()
                ts.append(time.perf_counter() - start)
            out.append(statistics.median(ts) * 1e6)
        print(f"  {name:40s} {out[0]:8.1f} / {out[1]:8.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=2000)
    ap.add_argument("--numel", type=int, default=2500)
    ap.add_argument("--steps", type=int, default=41)
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    phase_split(args.tensors, args.numel, args.steps)
    cold_calls(args.rounds)


if __name__ == "__main__":
    main()
