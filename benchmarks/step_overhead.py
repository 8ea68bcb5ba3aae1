"""Per-tensor cost of an optimizer step: optforge's paths against torch's, at 10 to 10,000 tensors.

Each tensor is small (``--numel`` entries, default 64), so the time is mostly the Python and
dispatch cost per tensor, printed in microseconds per tensor (median of ``--rounds`` rounds;
the entries run interleaved, so machine noise hits all alike). Also printed: for the generated
fused kernel (Lion, ``fused=True``), the share of the step spent outside the compiled kernel
at ``--split-tensors`` tensors (default 2,000) of ``--split-numel`` entries.

    python benchmarks/step_overhead.py                 # about 2 minutes on 2 cores
    python benchmarks/step_overhead.py --counts 10,100 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import optforge as of
from optforge import fused as fused_module

ENTRIES = {
    "torch.AdamW[foreach]": lambda ps: torch.optim.AdamW(ps, foreach=True),
    "torch.AdamW[fused]": lambda ps: torch.optim.AdamW(ps, fused=True),
    "optforge.AdamW[default]": lambda ps: of.AdamW(ps),
    "optforge.AdamW[eager]": lambda ps: of.AdamW(ps, fused=False),
    "optforge.Lion[eager]": lambda ps: of.Lion(ps, fused=False),
    "optforge.Lion[fused]": lambda ps: of.Lion(ps, fused=True),
}


def make(n: int, numel: int, factory) -> tuple[list, torch.optim.Optimizer]:
    params = [torch.nn.Parameter(torch.randn(numel)) for _ in range(n)]
    for p in params:
        p.grad = torch.randn(numel)
    opt = factory(params)
    for _ in range(3):           # state, flat buffers, compile
        opt.step()
    return params, opt


def time_steps(opt, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - start) / steps


def per_tensor_table(counts: list[int], numel: int, rounds: int) -> None:
    print(f"== microseconds per tensor per step ({numel} entries each; median of {rounds} rounds) ==")
    print(f"{'entry':28s}" + "".join(f"{n:>12d}" for n in counts))
    results = {name: {} for name in ENTRIES}
    for n in counts:
        opts = {name: make(n, numel, f)[1] for name, f in ENTRIES.items()}
        steps = max(1, 2000 // n)
        samples = {name: [] for name in ENTRIES}
        for _ in range(rounds):
            for name, opt in opts.items():
                samples[name].append(time_steps(opt, steps) / n * 1e6)
        for name in ENTRIES:
            results[name][n] = statistics.median(samples[name])
    for name in ENTRIES:
        print(f"{name:28s}" + "".join(f"{results[name][n]:12.2f}" for n in counts))


def kernel_share(n: int, numel: int, rounds: int) -> None:
    """Step time and time inside the compiled kernel of Lion(fused=True), medians."""
    inside = []
    original = fused_module.compiled_step

    def timed(*args, **kwargs):
        fn = original(*args, **kwargs)

        def run(*a, **k):
            start = time.perf_counter()
            fn(*a, **k)
            inside.append(time.perf_counter() - start)
        return run

    _, opt = make(n, numel, lambda ps: of.Lion(ps, fused=True))
    fused_module.compiled_step = timed
    try:
        totals = []
        for _ in range(rounds * 5):
            start = time.perf_counter()
            opt.step()
            totals.append(time.perf_counter() - start)
    finally:
        fused_module.compiled_step = original
    total, kernel = statistics.median(totals), statistics.median(inside)
    print(f"\n== Lion(fused=True), {n} tensors x {numel}: step {total * 1e3:.2f} ms, compiled kernel "
          f"{kernel * 1e3:.2f} ms, outside it {(total - kernel) * 1e3:.2f} ms "
          f"= {(total - kernel) / kernel:.2f}x the kernel ==")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="10,100,1000,10000")
    ap.add_argument("--numel", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--split-tensors", type=int, default=2000)
    ap.add_argument("--split-numel", type=int, default=2500)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    per_tensor_table([int(c) for c in args.counts.split(",")], args.numel, args.rounds)
    kernel_share(args.split_tensors, args.split_numel, args.rounds)


if __name__ == "__main__":
    main()
