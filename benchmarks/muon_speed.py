#!/usr/bin/env python
"""Muon's step time against its own Newton-Schulz time and torch.optim.Muon's, measured in one
run, with the step's peak temporaries.

The matrices of a shared workload of step_speed.py (``many-small`` by default: 100 matrices,
25 of each of 4 shapes), float32, CPU, fixed random gradients; entries interleaved in rounds,
medians. Entries:

- steps: ``torch.optim.Muon``; ``optforge.Muon`` (defaults: bf16 iteration, same-shape
  matrices stacked); ``optforge.Muon`` one matrix at a time (``ns_batch_numel = 0``);
  ``optforge.Muon(ns_dtype="float32")``;
- Newton-Schulz alone, on the same (fixed) inputs: torch.optim.Muon's own function per matrix;
  optforge's :func:`~optforge.optimizers.muon.orthogonalize` on the step's stacks and one
  matrix at a time, in bf16 and in float32.

It prints each median, the step / Newton-Schulz ratios, bf16 against float32, and the peak of
the bytes torch's CPU allocator holds during one step (the step's temporaries, from the
profiler's memory events) beside the largest stack of inputs.

    python benchmarks/muon_speed.py                          # many-small, a few minutes
    python benchmarks/muon_speed.py --workload many-tiny --rounds 10 --threads 1
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

import torch
from step_speed import THREADS, WORKLOADS, interleaved_medians, make_tensors, peak_step_bytes

import optforge
from optforge.optimizers.muon import Muon, _same_shape_stacks, orthogonalize


class Calls:
    """Not an optimizer: ``step()`` runs ``fn`` (so Newton-Schulz alone times like a step)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.step = fn


def one_at_a_time(params: list[torch.Tensor]) -> Muon:
    opt = optforge.Muon(params)
    opt.ns_batch_numel = 0
    return opt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="many-small", choices=sorted(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument("--threads", type=int, default=THREADS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    workload = WORKLOADS[args.workload]
    keep = [i for i, s in enumerate(workload.shapes) if len(s) >= 2]
    grads = [make_tensors(workload, seed=1)[i] for i in keep]

    from torch.optim._muon import _zeropower_via_newtonschulz as torch_ns

    coefficients = (3.4445, -4.7750, 2.0315)
    stacks = [torch.stack([grads[i] for i in s]) for s in _same_shape_stacks(list(range(len(grads))), grads,
                                                                              Muon.ns_batch_numel)]
    steps: dict[str, Callable[[list[torch.Tensor]], Any]] = {
        "torch.optim.Muon": lambda ps: torch.optim.Muon(ps),
        "optforge.Muon": lambda ps: optforge.Muon(ps),
        "optforge.Muon[one at a time]": one_at_a_time,
        "optforge.Muon[float32]": lambda ps: optforge.Muon(ps, ns_dtype="float32"),
    }
    opts: dict[str, Any] = {}
    for name, make in steps.items():
        params = [make_tensors(workload, seed=0)[i].requires_grad_() for i in keep]
        for p, g in zip(params, grads):
            p.grad = g
        opt = opts[name] = make(params)
        opt.step()                                            # untimed: creates the state
    opts["NS: torch, per matrix"] = Calls(lambda: [torch_ns(g, coefficients, 5, 1e-7) for g in grads])
    for dtype in (torch.bfloat16, torch.float32):
        tag = "bf16" if dtype == torch.bfloat16 else "float32"
        opts[f"NS: optforge, stacked, {tag}"] = Calls(
            lambda dtype=dtype: [orthogonalize(x, dtype=dtype) for x in stacks])
        opts[f"NS: optforge, per matrix, {tag}"] = Calls(
            lambda dtype=dtype: [orthogonalize(g, dtype=dtype) for g in grads])
    median = interleaved_medians(opts, args.rounds, args.steps_per_round)

    n = sum(g.numel() for g in grads)
    print(f"workload {workload.name}: its {len(grads)} matrices ({n:,} params, "
          f"{len({tuple(g.shape) for g in grads})} shapes, stacks of up to {max(len(s) for s in stacks)}); "
          f"{args.threads} thread(s); median of {args.rounds * args.steps_per_round} each")
    for name, t in median.items():
        print(f"  {name:36s} {1e3 * t:10.2f} ms")
    step, ns = median["optforge.Muon"], median["NS: optforge, stacked, bf16"]
    print(f"optforge.Muon step / its Newton-Schulz (stacked, bf16): {step / ns:.2f} (target <= 1.15)")
    theirs = median["NS: torch, per matrix"]
    print(f"optforge.Muon step / torch.optim.Muon's Newton-Schulz: {step / theirs:.2f} (target <= 1.15)")
    print(f"optforge.Muon step / torch.optim.Muon step: {step / median['torch.optim.Muon']:.2f}")
    print(f"stacked / one at a time: Newton-Schulz {ns / median['NS: optforge, per matrix, bf16']:.2f}, "
          f"step {step / median['optforge.Muon[one at a time]']:.2f}")
    per_matrix = median["NS: optforge, per matrix, bf16"] / median["NS: optforge, per matrix, float32"]
    print(f"bf16 / float32: Newton-Schulz stacked {ns / median['NS: optforge, stacked, float32']:.2f}, "
          f"per matrix {per_matrix:.2f}, "
          f"step {step / median['optforge.Muon[float32]']:.2f}")
    largest = max(math.prod(x.shape) * 4 for x in stacks)
    for name in ("optforge.Muon", "optforge.Muon[one at a time]", "torch.optim.Muon"):
        peak = peak_step_bytes(opts[name])
        print(f"peak temporaries of a step, {name}: {peak / 1e6:.2f} MB = {peak / largest:.2f} x the largest "
              f"float32 stack ({largest / 1e6:.2f} MB), {peak / (4 * n):.2f} x the matrices")


if __name__ == "__main__":
    main()
