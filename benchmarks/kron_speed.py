#!/usr/bin/env python
"""PSGDKron's step time against AdamW, pytorch_optimizer's Kron and heavyball's PSGDKron,
measured in one run.

float32, CPU, a shared workload of step_speed.py (``many-small`` by default), fixed random
gradients; only ``opt.step()`` is timed, entries interleaved in rounds, medians. Every Kron
updates its preconditioner at every step (probability 1), so the entries do the same work;
the peers are optional (skipped when not installed).

    python benchmarks/kron_speed.py
    python benchmarks/kron_speed.py --workload many-tiny --rounds 5 --threads 1
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from step_speed import THREADS, WORKLOADS, interleaved_medians, make_tensors

import optforge


def entries() -> dict[str, Callable[[list[torch.Tensor]], Any]]:
    out: dict[str, Callable[[list[torch.Tensor]], Any]] = {
        "torch.AdamW[foreach]": lambda ps: torch.optim.AdamW(ps, foreach=True),
        "optforge.PSGDKron": lambda ps: optforge.PSGDKron(ps, preconditioner_update_probability=1.0)}
    try:
        from pytorch_optimizer import Kron
        out["pytorch_optimizer.Kron"] = lambda ps: Kron(ps, preconditioner_update_probability=1.0)
    except ImportError:
        pass
    try:
        from heavyball import PSGDKron
        out["heavyball.PSGDKron"] = lambda ps: PSGDKron(ps, preconditioner_update_probability=1.0)
    except Exception:          # heavyball's import compiles and may fail on a bare CPU setup
        pass
    return out


def give_grads(opt: Any, grads: list[torch.Tensor]) -> None:
    """Fresh copies of the fixed gradients (untimed): heavyball drops ``p.grad`` after a step."""
    params = [p for group in opt.param_groups for p in group["params"]]
    for p, g in zip(params, grads):
        p.grad = g.clone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="many-small", choices=sorted(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument("--threads", type=int, default=THREADS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    workload = WORKLOADS[args.workload]
    grads = make_tensors(workload, seed=1)
    opts: dict[str, Any] = {}
    failed: dict[str, str] = {}
    for name, make in entries().items():
        params = [p.requires_grad_() for p in make_tensors(workload, seed=0)]
        try:
            opt = make(params)
            for _ in range(2):                        # untimed: creates state (and compiles)
                give_grads(opt, grads)
                opt.step()
        except Exception as e:                        # a peer that cannot run here is reported
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
            continue
        opts[name] = opt
    median = interleaved_medians(opts, args.rounds, args.steps_per_round,
                                 before_step=lambda opt: give_grads(opt, grads))
    base = median["torch.AdamW[foreach]"]
    print(f"workload {workload.name}: {workload.n_tensors} tensors, {workload.n_params:,} params; "
          f"{args.threads} thread(s); median of {args.rounds * args.steps_per_round} steps each")
    for name, t in median.items():
        print(f"  {name:28s} {1e3 * t:10.1f} ms   {t / base:8.1f} x AdamW")
    for name, why in failed.items():
        print(f"  {name:28s} did not run: {why}")
    if "optforge.PSGDKron" in median:
        for peer in ("pytorch_optimizer.Kron", "heavyball.PSGDKron"):
            if peer in median:
                print(f"optforge.PSGDKron / {peer}: {median['optforge.PSGDKron'] / median[peer]:.2f}")


if __name__ == "__main__":
    main()
