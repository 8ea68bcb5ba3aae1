#!/usr/bin/env python
"""Muon's step time against its own Newton-Schulz time and torch.optim.Muon's, measured in one
run, with the step's peak temporaries.

The matrices of a shared workload of step_speed.py (``many-small`` by default: 100 matrices,
25 of each of 4 shapes), float32, CPU, fixed random gradients; entries interleaved in rounds,
each entry's fastest step of a round kept; times are medians over rounds, and a ratio is the
median over rounds of the two entries' ratio in the same round (they met about the same
load); ``--threads 1,2`` (the default) times every entry at 1 thread, then at 2 (switching
the count between steps would make a timed step follow the thread pool's resizing). Entries:

- steps: ``torch.optim.Muon``; ``optforge.Muon`` (defaults: bf16 iteration, same-shape
  matrices stacked); ``optforge.Muon`` one matrix at a time (``ns_batch_numel = 0``);
  ``optforge.Muon(ns_dtype="float32")``;
- Newton-Schulz alone, on the same (fixed) inputs: torch.optim.Muon's own function per matrix
  (from the float32 matrix: it casts to bf16 itself); optforge's
  :func:`~optforge.optimizers.muon.orthogonalize` on the step's stacks and one matrix at a
  time, in bf16 (from inputs already in bf16: the iteration alone, as the step runs it) and in
  float32; like the step's, its iterates are written into one work buffer kept across calls
  (the step's lies in the optimizer's scratch pool), so neither pays for fresh memory.

It prints each time, the step / Newton-Schulz ratios, bf16 against float32, the peak of the
bytes torch's CPU allocator holds during one step with the optimizer's scratch buffers
released first (the step's temporaries, from the profiler's memory events) and the scratch
bytes it holds between steps, beside the largest stack of inputs, and a Markdown table of the two
target ratios per thread count with the load average, ready to paste. ``--targets-only``
times only the entries of that table.

    python benchmarks/muon_speed.py                          # many-small, 1 and 2 threads
    python benchmarks/muon_speed.py --targets-only --rounds 9
    python benchmarks/muon_speed.py --workload many-tiny --rounds 10 --threads 1

``--before DIR`` adds the step of another optforge version's Muon (same ratios, and this
step / that one), e.g. the commit before a change::

    git archive COMMIT src/optforge | tar -x -C /tmp/old && mv /tmp/old/src/optforge /tmp/old/optforge_before
    python benchmarks/muon_speed.py --targets-only --before /tmp/old
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import math
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from step_speed import WORKLOADS, cpu_name, loadavg, make_tensors, peak_step_bytes

import optforge
from optforge import scratch
from optforge.optimizers.muon import Muon, _same_shape_stacks, orthogonalize
from optforge.optimizers.newton_schulz import work_bytes

TARGET = 1.15                      # step / Newton-Schulz time
BEFORE = "before: optforge.Muon"
STEP, OWN_NS, TORCH_NS, TORCH_STEP = ("optforge.Muon", "NS: optforge, stacked, bf16", "NS: torch, per matrix",
                                      "torch.optim.Muon")


class Calls:
    """Not an optimizer: ``step()`` runs ``fn`` (so Newton-Schulz alone times like a step)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.step = fn


def one_at_a_time(params: list[torch.Tensor]) -> Muon:
    opt = optforge.Muon(params)
    opt.ns_batch_numel = 0
    return opt


def thread_counts(text: str) -> list[int]:
    counts = [int(x) for x in text.split(",") if x.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"invalid thread counts {text!r}: expected e.g. 1,2")
    return counts


def entries(workload, keep: list[int], grads: list[torch.Tensor], targets_only: bool,
            before: str | None) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Every entry (its state created by one untimed step), and the stacks of inputs."""
    from torch.optim._muon import _zeropower_via_newtonschulz as torch_ns

    coefficients = (3.4445, -4.7750, 2.0315)
    stacks = [torch.stack([grads[i] for i in s]) for s in _same_shape_stacks(list(range(len(grads))), grads,
                                                                              Muon.ns_batch_numel)]
    steps: dict[str, Callable[[list[torch.Tensor]], Any]] = {
        TORCH_STEP: lambda ps: torch.optim.Muon(ps),
        STEP: lambda ps: optforge.Muon(ps),
        "optforge.Muon[one at a time]": one_at_a_time,
        "optforge.Muon[float32]": lambda ps: optforge.Muon(ps, ns_dtype="float32"),
    }
    if targets_only:
        steps = {name: steps[name] for name in (TORCH_STEP, STEP)}
    if before is not None:                   # another optforge version, as package optforge_before
        sys.path.insert(0, before)
        older = importlib.import_module("optforge_before")
        steps[BEFORE] = lambda ps: older.Muon(ps)
    opts: dict[str, Any] = {}
    for name, make in steps.items():
        params = [make_tensors(workload, seed=0)[i].requires_grad_() for i in keep]
        for p, g in zip(params, grads):
            p.grad = g
        opt = opts[name] = make(params)
        opt.step()                                            # untimed: creates the state
    opts[TORCH_NS] = Calls(lambda: [torch_ns(g, coefficients, 5, 1e-7) for g in grads])
    for dtype in (torch.bfloat16, torch.float32):
        tag = "bf16" if dtype == torch.bfloat16 else "float32"
        if targets_only and dtype != torch.bfloat16:
            continue
        xs = [x.to(dtype) for x in stacks]
        work = work_buffer(xs)
        opts[f"NS: optforge, stacked, {tag}"] = Calls(
            lambda xs=xs, work=work: [orthogonalize(x, dtype=None, work=work) for x in xs])
        if not targets_only:
            ms = [g.to(dtype) for g in grads]
            work = work_buffer(ms)
            opts[f"NS: optforge, per matrix, {tag}"] = Calls(
                lambda ms=ms, work=work: [orthogonalize(g, dtype=None, work=work) for g in ms])
    return opts, stacks


def work_buffer(inputs: list[torch.Tensor]) -> torch.Tensor:
    """One work buffer for orthogonalize on each of ``inputs`` in turn, as the step's."""
    return torch.empty(max(work_bytes(tuple(x.shape), x.dtype) for x in inputs), dtype=torch.uint8)


def fastest_per_round(opts: dict[str, Any], rounds: int, steps_per_round: int) -> dict[str, list[float]]:
    """Each entry's fastest step in every round, the entries interleaved (each leads once in
    turn): a step and a Newton-Schulz timed in the same round met about the same load."""
    times: dict[str, list[float]] = {name: [] for name in opts}
    for r in range(rounds):
        order = list(opts)
        for name in order[r % len(order):] + order[:r % len(order)]:
            best = math.inf
            for _ in range(steps_per_round):
                start = time.perf_counter()
                opts[name].step()
                best = min(best, time.perf_counter() - start)
            times[name].append(best)
    return times


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """The median over rounds of a's time / b's time in the same round."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def report(times: dict[str, list[float]]) -> None:
    for name, ts in times.items():
        print(f"  {name:36s} {1e3 * statistics.median(ts):10.2f} ms")
    print(f"optforge.Muon step / its Newton-Schulz (stacked, bf16): {ratio(times, STEP, OWN_NS):.2f} "
          f"(target <= {TARGET})")
    print(f"optforge.Muon step / torch.optim.Muon's Newton-Schulz: {ratio(times, STEP, TORCH_NS):.2f} "
          f"(target <= {TARGET})")
    print(f"optforge.Muon step / torch.optim.Muon step: {ratio(times, STEP, TORCH_STEP):.2f}")
    if BEFORE in times:
        print(f"before: step / its Newton-Schulz {ratio(times, BEFORE, OWN_NS):.2f}, step / torch's "
              f"Newton-Schulz {ratio(times, BEFORE, TORCH_NS):.2f}; step / before's step "
              f"{ratio(times, STEP, BEFORE):.2f}")
    if "optforge.Muon[one at a time]" not in times:
        return
    print("stacked / one at a time: Newton-Schulz "
          f"{ratio(times, OWN_NS, 'NS: optforge, per matrix, bf16'):.2f}, "
          f"step {ratio(times, STEP, 'optforge.Muon[one at a time]'):.2f}")
    print("bf16 / float32: Newton-Schulz stacked "
          f"{ratio(times, OWN_NS, 'NS: optforge, stacked, float32'):.2f}, per matrix "
          f"{ratio(times, 'NS: optforge, per matrix, bf16', 'NS: optforge, per matrix, float32'):.2f}, "
          f"step {ratio(times, STEP, 'optforge.Muon[float32]'):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="many-small", choices=sorted(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument("--threads", type=thread_counts, default=[1, 2],
                        help="comma list of thread counts, every entry timed at each in turn (default 1,2)")
    parser.add_argument("--targets-only", action="store_true",
                        help="time only the steps of optforge.Muon and torch.optim.Muon and their "
                        "Newton-Schulz iterations")
    parser.add_argument("--before", metavar="DIR",
                        help="also time the Muon of another optforge version: DIR holds its "
                        "src/optforge renamed to optforge_before (see the module docstring)")
    args = parser.parse_args()
    workload = WORKLOADS[args.workload]
    keep = [i for i, s in enumerate(workload.shapes) if len(s) >= 2]
    grads = [make_tensors(workload, seed=1)[i] for i in keep]

    times: dict[int, dict[str, list[float]]] = {}
    load: dict[int, tuple[float, float]] = {}
    opts: dict[str, Any] = {}
    stacks: list[torch.Tensor] = []
    for threads in args.threads:                   # one thread count at a time: no switching mid-round
        torch.set_num_threads(threads)
        opts, stacks = entries(workload, keep, grads, args.targets_only, args.before)
        before = loadavg()
        times[threads] = fastest_per_round(opts, args.rounds, args.steps_per_round)
        load[threads] = (before, loadavg())

    n = sum(g.numel() for g in grads)
    print(f"workload {workload.name}: its {len(grads)} matrices ({n:,} params, "
          f"{len({tuple(g.shape) for g in grads})} shapes, stacks of up to {max(len(s) for s in stacks)}); "
          f"{args.rounds} rounds: medians of each round's fastest of {args.steps_per_round} steps, "
          "ratios the median of the rounds' ratios")
    for threads in args.threads:
        print(f"{threads} thread(s), load average {load[threads][0]:.1f} before and "
              f"{load[threads][1]:.1f} after:")
        report(times[threads])

    threads = args.threads[-1]                     # the last entries made, at the last thread count
    largest = max(math.prod(x.shape) * 4 for x in stacks)
    names = [STEP, TORCH_STEP] if args.targets_only else [STEP, "optforge.Muon[one at a time]", TORCH_STEP]
    names += [BEFORE] if BEFORE in opts else []
    for name in names:
        scratch.release(opts[name])                # so the step allocates its buffers again
        peak = peak_step_bytes(opts[name])
        held = scratch.held_bytes(opts[name])
        print(f"peak temporaries of a step ({threads} thread(s)), {name}: {peak / 1e6:.2f} MB = "
              f"{peak / largest:.2f} x the largest float32 stack ({largest / 1e6:.2f} MB), "
              f"{peak / (4 * n):.2f} x the matrices; held between steps {held / 1e6:.2f} MB = "
              f"{held / largest:.2f} x that stack")

    print(f"\n{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu_name()}, torch "
          f"{torch.__version__}, {workload.name}, {args.rounds} rounds of {args.steps_per_round} steps:\n")
    print("| threads | load average | optforge.Muon step ms | its Newton-Schulz ms | step / its NS "
          "| torch's NS ms | step / torch's NS | torch.optim.Muon step ms |")
    print("|---|---|---|---|---|---|---|---|")
    for k in args.threads:
        ms = {name: 1e3 * statistics.median(ts) for name, ts in times[k].items()}
        print(f"| {k} | {load[k][0]:.1f}-{load[k][1]:.1f} | {ms[STEP]:.1f} | {ms[OWN_NS]:.1f} "
              f"| **{ratio(times[k], STEP, OWN_NS):.2f}** | {ms[TORCH_NS]:.1f} "
              f"| **{ratio(times[k], STEP, TORCH_NS):.2f}** | {ms[TORCH_STEP]:.1f} |")
    for k in args.threads:
        if BEFORE in times[k]:
            print(f"\n{k} thread(s), the version before: its step / its Newton-Schulz "
                  f"{ratio(times[k], BEFORE, OWN_NS):.2f}, / torch's Newton-Schulz "
                  f"{ratio(times[k], BEFORE, TORCH_NS):.2f}; this step / its step "
                  f"{ratio(times[k], STEP, BEFORE):.2f}")


if __name__ == "__main__":
    main()
