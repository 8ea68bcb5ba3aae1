"""Per-tensor cost of an optimizer step: optforge's paths against torch's, at 10 to 10,000 tensors.

Each tensor is small (``--numel`` entries, default 64), so the time is mostly the Python and
dispatch cost per tensor, printed in microseconds per tensor (median of ``--rounds`` rounds;
the entries run interleaved, so machine noise hits all alike).

For the generated fused kernel (Lion, ``fused=True``) the step is also split into the compiled
kernel, the copy of the gradients into the flat buffer (``p.grad`` is left alone, so this C++
copy runs every step) and the rest (Python: the step's checks and bookkeeping), at each count
(median and minimum over the steps: preemption on a loaded machine only adds; with a fit
``rest = a + b * tensors``) and at ``--split-tensors`` tensors (default 2,000) of
``--split-numel`` entries, where the kernel has real work to do.

With ``--fresh-grads`` each step gets new gradients from a backward pass (not timed), as in
training: Python then also builds a new tensor object for each gradient it reads (about
0.4-0.5 us per tensor on this CPU, for torch's optimizers as for optforge's).

    python benchmarks/step_overhead.py                 # about 2 minutes on 2 cores
    python benchmarks/step_overhead.py --counts 10,100 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import torch

import optforge as of
from optforge import fused as fused_module

ENTRIES = {
    "torch.AdamW[foreach]": lambda ps: torch.optim.AdamW(ps, foreach=True),
    "torch.AdamW[fused]": lambda ps: torch.optim.AdamW(ps, fused=True),
    "optforge.AdamW[default]": lambda ps: of.AdamW(ps),
    "optforge.AdamW[fused]": lambda ps: of.AdamW(ps, fused=True),
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


def new_grads(params: list) -> None:
    """Gradients as training makes them: new tensors from a backward pass, which Python has
    not seen yet."""
    for p in params:
        p.grad = None
    torch.autograd.backward([p.sum() for p in params])


def time_steps(opt, params: list, steps: int, fresh: bool) -> float:
    """Mean seconds of ``opt.step()`` alone (``fresh``: new gradients before each step)."""
    total = 0.0
    for _ in range(steps):
        if fresh:
            new_grads(params)
        start = time.perf_counter()
        opt.step()
        total += time.perf_counter() - start
    return total / steps


def per_tensor_table(counts: list[int], numel: int, rounds: int, fresh: bool) -> None:
    grads = "new gradients" if fresh else "the same gradients"
    print(f"== microseconds per tensor per step ({numel} entries each, {grads} each step; "
          f"median of {rounds} rounds) ==")
    print(f"{'entry':28s}" + "".join(f"{n:>12d}" for n in counts))
    results = {name: {} for name in ENTRIES}
    for n in counts:
        made = {name: make(n, numel, f) for name, f in ENTRIES.items()}
        steps = max(1, 2000 // n)
        samples = {name: [] for name in ENTRIES}
        for _ in range(rounds):
            for name, (params, opt) in made.items():
                samples[name].append(time_steps(opt, params, steps, fresh) / n * 1e6)
        for name in ENTRIES:
            results[name][n] = statistics.median(samples[name])
    for name in ENTRIES:
        print(f"{name:28s}" + "".join(f"{results[name][n]:12.2f}" for n in counts))


@contextmanager
def timed_parts():
    """Record the seconds spent in the compiled fused kernel calls and in the gradient copy,
    added to the last entry of each list (the caller appends one entry per step)."""
    parts = {"kernel": [], "copy": []}
    compiled, gather = fused_module.compiled_step, fused_module.FlatBucket.gather_grads

    def compiled_step(*args, **kwargs):
        fn = compiled(*args, **kwargs)

        def run(*a, **k):
            start = time.perf_counter()
            fn(*a, **k)
            parts["kernel"][-1] += time.perf_counter() - start
        return run

    def gather_grads(self, grads):
        start = time.perf_counter()
        out = gather(self, grads)
        parts["copy"][-1] += time.perf_counter() - start
        return out

    fused_module.compiled_step, fused_module.FlatBucket.gather_grads = compiled_step, gather_grads
    try:
        yield parts
    finally:
        fused_module.compiled_step, fused_module.FlatBucket.gather_grads = compiled, gather


def split_step(opt, params: list, steps: int, fresh: bool) -> dict[str, float]:
    """Median seconds of a fused step, its kernel, its gradient copy, and the rest."""
    totals = []
    with timed_parts() as parts:
        for _ in range(steps):
            if fresh:
                new_grads(params)
            parts["kernel"].append(0.0)
            parts["copy"].append(0.0)
            start = time.perf_counter()
            opt.step()
            totals.append(time.perf_counter() - start)
    rest = [t - k - c for t, k, c in zip(totals, parts["kernel"], parts["copy"])]
    return dict(step=statistics.median(totals), kernel=statistics.median(parts["kernel"]),
                copy=statistics.median(parts["copy"]), rest=statistics.median(rest), rest_min=min(rest))


def fused_split_table(counts: list[int], numel: int, rounds: int, fresh: bool) -> None:
    """Lion(fused=True): microseconds per tensor in each part of the step, and a linear fit of
    the rest (the Python cost) against the number of tensors."""
    print(f"\n== Lion(fused=True), microseconds per tensor per step, by part ({numel} entries each) ==")
    print(f"{'part':28s}" + "".join(f"{n:>12d}" for n in counts))
    rows = {}
    for n in counts:
        params, opt = make(n, numel, lambda ps: of.Lion(ps, fused=True))
        rows[n] = split_step(opt, params, rounds * max(3, 2000 // n), fresh)
    for part in ("step", "kernel", "copy", "rest", "rest_min"):
        print(f"{part:28s}" + "".join(f"{rows[n][part] / n * 1e6:12.2f}" for n in counts))
    if len(counts) >= 2:
        lo, hi = counts[-2], counts[-1]
        for part in ("rest", "rest_min"):
            slope = (rows[hi][part] - rows[lo][part]) / (hi - lo)
            print(f"{part} = {(rows[lo][part] - slope * lo) * 1e6:.1f} us + {slope * 1e6:.3f} us x tensors "
                  f"(fit through {lo} and {hi} tensors)")


def torch_split(opt, params: list, steps: int, fresh: bool) -> dict[str, float]:
    """Median seconds of a torch.optim.AdamW(fused=True) step, of its ``torch._fused_adamw_``
    kernel call, and of the rest (its Python)."""
    kernel, totals, rest = torch._fused_adamw_, [], []
    spent = [0.0]

    def timed(*args, **kwargs):
        start = time.perf_counter()
        kernel(*args, **kwargs)
        spent[0] += time.perf_counter() - start

    torch._fused_adamw_ = timed
    try:
        for _ in range(steps):
            if fresh:
                new_grads(params)
            spent[0] = 0.0
            start = time.perf_counter()
            opt.step()
            totals.append(time.perf_counter() - start)
            rest.append(totals[-1] - spent[0])
    finally:
        torch._fused_adamw_ = kernel
    step, other = statistics.median(totals), statistics.median(rest)
    return dict(step=step, rest=other, kernel=step - other)


def kernel_share(n: int, numel: int, rounds: int, fresh: bool) -> None:
    params, opt = make(n, numel, lambda ps: of.Lion(ps, fused=True))
    r = split_step(opt, params, rounds * 5, fresh)
    ms = {k: v * 1e3 for k, v in r.items()}
    print(f"\n== Lion(fused=True), {n} tensors x {numel}: step {ms['step']:.2f} ms = compiled kernel "
          f"{ms['kernel']:.2f} ms + gradient copy {ms['copy']:.2f} ms + the rest {ms['rest']:.2f} ms; "
          f"outside the kernel {(r['step'] - r['kernel']) / r['kernel']:.2f}x the kernel, of which the "
          f"rest (Python) {r['rest'] / r['kernel']:.2f}x ==")
    del params, opt
    params, opt = make(n, numel, lambda ps: torch.optim.AdamW(ps, fused=True))
    t = torch_split(opt, params, rounds * 5, fresh)
    print(f"== for reference, torch.optim.AdamW(fused=True) on the same tensors: step "
          f"{t['step'] * 1e3:.2f} ms = its kernel {t['kernel'] * 1e3:.2f} ms + the rest "
          f"{t['rest'] * 1e3:.2f} ms "
          f"({t['rest'] / t['kernel']:.2f}x its kernel, {t['rest'] / r['rest']:.2f}x Lion's rest) ==")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="10,100,1000,10000")
    ap.add_argument("--numel", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--split-tensors", type=int, default=2000)
    ap.add_argument("--split-numel", type=int, default=2500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fresh-grads", action="store_true",
                    help="new gradients from a backward pass before each step, as in training")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    counts = [int(c) for c in args.counts.split(",")]
    per_tensor_table(counts, args.numel, args.rounds, args.fresh_grads)
    fused_split_table(counts, args.numel, args.rounds, args.fresh_grads)
    kernel_share(args.split_tensors, args.split_numel, args.rounds, args.fresh_grads)


if __name__ == "__main__":
    main()
