#!/usr/bin/env python
"""Shampoo's step time against AdamW and pytorch_optimizer's Shampoo, measured in one run.

float32, CPU, ``torch.set_num_threads(2)``, fixed random gradients, a shared workload of
step_speed.py (``many-small`` by default); only ``opt.step()`` is timed, entries interleaved in
rounds. A Shampoo step is of two kinds, timed apart:

- ``plain``: factor update and preconditioning with the current inverse roots;
- ``roots``: the same, plus new inverse roots (one eigendecomposition per factor), which
  optforge's Shampoo runs every ``precondition_frequency`` steps (default 100) and
  pytorch_optimizer's Shampoo every ``preconditioning_compute_steps`` (default 1).

Each Shampoo is built to compute roots at its first (untimed) step; ``plain`` entries then stop
computing them, ``roots`` entries compute them at every step. The last line prints optforge's
mean step at ``precondition_frequency=100``: plain + (roots - plain) / 100.

    python benchmarks/shampoo_speed.py                       # many-small, ~5 min on 2 busy cores
    python benchmarks/shampoo_speed.py --workload many-tiny --rounds 5 --threads 1
    # against another version, interleaved in the same run:
    git archive COMMIT src/optforge | tar -x -C /tmp/old && mv /tmp/old/src/optforge /tmp/old/optforge_before
    python benchmarks/shampoo_speed.py --workload many-tiny --before /tmp/old
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from typing import Any

import torch
from step_speed import THREADS, WORKLOADS, interleaved_medians, make_tensors

import optforge

NEVER = 10**9   # a period no run reaches: no more inverse roots after the first step


def optforge_shampoo(roots_every_step: bool, package: Any = optforge) -> Callable[[list[torch.Tensor]], Any]:
    def make(params):
        opt = package.Shampoo(params, precondition_frequency=1, start_preconditioning_step=1)
        if not roots_every_step:
            opt.first_step_done = lambda: opt.param_groups[0].update(precondition_frequency=NEVER)
        return opt
    return make


def peer_shampoo(roots_every_step: bool) -> Callable[[list[torch.Tensor]], Any] | None:
    try:
        from pytorch_optimizer import Shampoo
    except ImportError:
        return None

    def make(params):
        opt = Shampoo(params, preconditioning_compute_steps=1)
        if not roots_every_step:      # read from the instance, not the param group
            opt.first_step_done = lambda: setattr(opt, "preconditioning_compute_steps", NEVER)
        return opt
    return make


def entries(before: str | None = None) -> dict[str, Callable[[list[torch.Tensor]], Any]]:
    out = {"torch.AdamW[foreach]": lambda ps: torch.optim.AdamW(ps, foreach=True),
           "optforge.Shampoo[plain]": optforge_shampoo(False),
           "optforge.Shampoo[roots]": optforge_shampoo(True)}
    if before is not None:                   # another optforge version, as package optforge_before
        sys.path.insert(0, before)
        older = importlib.import_module("optforge_before")
        out.update({"before.Shampoo[plain]": optforge_shampoo(False, older),
                    "before.Shampoo[roots]": optforge_shampoo(True, older)})
    for kind, every in (("plain", False), ("roots", True)):
        make = peer_shampoo(every)
        if make is not None:
            out[f"pytorch_optimizer.Shampoo[{kind}]"] = make
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="many-small", choices=sorted(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument("--threads", type=int, default=THREADS,
                        help="torch threads (default: the shared workloads' 2; on a machine whose cores "
                             "are oversubscribed, 1 keeps LAPACK's eigh from stalling)")
    parser.add_argument("--before", metavar="DIR",
                        help="also time the Shampoo of another optforge version: DIR holds its "
                             "src/optforge renamed to optforge_before (see the module docstring)")
    parser.add_argument("--plain-only", action="store_true", help="leave out the [roots] entries")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    workload = WORKLOADS[args.workload]
    grads = make_tensors(workload, seed=1)
    opts: dict[str, Any] = {}
    chosen = {name: make for name, make in entries(args.before).items()
              if not (args.plain_only and name.endswith("[roots]"))}
    for name, make in chosen.items():
        params = [p.requires_grad_() for p in make_tensors(workload, seed=0)]
        for p, g in zip(params, grads):
            p.grad = g.clone()            # pytorch_optimizer's Shampoo changes its gradients in place
        opt = opts[name] = make(params)
        opt.step()                                    # untimed: creates state, computes roots
        getattr(opt, "first_step_done", lambda: None)()
    median = interleaved_medians(opts, args.rounds, args.steps_per_round)
    base = median["torch.AdamW[foreach]"]
    print(f"workload {workload.name}: {workload.n_tensors} tensors, {workload.n_params:,} params; "
          f"{args.threads} thread(s); median of {args.rounds * args.steps_per_round} steps each")
    for name, t in median.items():
        peer = median.get(f"pytorch_optimizer.Shampoo[{name.rsplit('[', 1)[-1]}")
        print(f"  {name:36s} {1e3 * t:10.1f} ms   {t / base:8.2f} x AdamW" + (
            f"   {t / peer:6.2f} x pytorch_optimizer's" if peer and name.endswith("]") else ""))
    if args.plain_only:
        return
    plain, roots = median["optforge.Shampoo[plain]"], median["optforge.Shampoo[roots]"]
    mean = plain + (roots - plain) / 100
    print(f"optforge.Shampoo at precondition_frequency=100: {1e3 * mean:.1f} ms a step on average, "
          f"{mean / base:.1f} x AdamW" + "".join(
              f", {mean / median[f'pytorch_optimizer.Shampoo[{k}]']:.2f} x pytorch_optimizer's Shampoo[{k}]"
              for k in ("roots", "plain") if f"pytorch_optimizer.Shampoo[{k}]" in median))


if __name__ == "__main__":
    main()
