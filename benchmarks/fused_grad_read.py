"""Generated ``fused=True`` step: large gradients read in place against all of them copied in.

The generated kernel runs on flat buffers. The gradients of small tensors are copied into a
flat one each step; those of tensors of ``optforge.fused.READ_IN_PLACE`` entries and more
(2^20 on CPU) are read where they are, in a kernel call per tensor. This times both on
separate optimizers in one process, rounds interleaved (median step time), with torch's fused
AdamW as the common reference:

- one-big: one (4096, 8192) float32 tensor (33.5M entries);
- lm: the parameter shapes of a 6-block, 768-wide transformer with a 16,384-token embedding
  (55M entries in 75 tensors, 19 of them large);
- many-small: step_speed.py's 25 blocks 128 wide, 300 tensors, 4.96M entries, none large
  (the two should tie).

    python benchmarks/fused_grad_read.py                       # ~1-2 minutes on 2 cores
    python benchmarks/fused_grad_read.py --only lion --workloads one-big --rounds 5
    python benchmarks/fused_grad_read.py --only lion,adan --workloads many-small --sweep
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from unittest import mock

import torch
from step_speed import transformer_shapes

import optforge as of
from optforge import fused as fused_module

OPTIMIZERS = {"lion": of.Lion, "adabelief": of.AdaBelief, "adan": of.Adan,
              "schedule_free_adamw": of.ScheduleFreeAdamW}


def lm_shapes() -> list[tuple[int, ...]]:
    """A 16,384 x 768 embedding, 6 transformer blocks (768 wide, ff 3,072) and a final LayerNorm."""
    return [(16384, 768)] + transformer_shapes(768, 3072, blocks=6) + [(768,), (768,)]


WORKLOADS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "one-big": lambda: [(4096, 8192)], "lm": lm_shapes,
    "many-small": lambda: transformer_shapes(128, 512)}


def make(make_opt: Callable, start: list[torch.Tensor], grads: list[torch.Tensor],
         read_in_place: dict[str, int] | None = None):
    """An optimizer over copies of ``start`` with ``grads``, its first step taken with
    ``READ_IN_PLACE`` set to ``read_in_place`` (None: as it is; {}: every gradient copied)."""
    params = [torch.nn.Parameter(x.clone()) for x in start]
    for p, g in zip(params, grads):
        p.grad = g                              # read only: the same gradients for every entry
    values = fused_module.READ_IN_PLACE if read_in_place is None else read_in_place
    with mock.patch.dict(fused_module.READ_IN_PLACE, values, clear=True):
        opt = make_opt(params)
        opt.step()                              # builds the flat buffers (and compiles)
    return opt


def timed(opt, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - start) / steps


def run(workload: str, names: list[str], rounds: int, steps: int) -> None:
    shapes = WORKLOADS[workload]()
    torch.manual_seed(0)
    start = [torch.randn(s) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    large = sum(1 for x in start if x.numel() >= fused_module.READ_IN_PLACE.get("cpu", float("inf")))
    print(f"\n== {workload}: {len(shapes)} tensors, {sum(x.numel() for x in start) / 1e6:.1f}M entries, "
          f"{large} read in place; ms per step, median of {rounds} rounds of {steps} steps ==")
    entries = {"torch.AdamW[fused]": make(lambda ps: torch.optim.AdamW(ps, fused=True), start, grads)}
    for name in names:
        cls = OPTIMIZERS[name]
        entries[f"{name}[copied]"] = make(lambda ps, c=cls: c(ps, fused=True), start, grads, {})
        entries[f"{name}[in place]"] = make(lambda ps, c=cls: c(ps, fused=True), start, grads)
    samples: dict[str, list[float]] = {k: [] for k in entries}
    for _ in range(rounds):
        for key, opt in entries.items():
            samples[key].append(timed(opt, steps))
    ms = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
    ref = ms["torch.AdamW[fused]"]
    print(f"{'optimizer':22s}{'copied':>10s}{'in place':>10s}{'in place / copied':>19s}"
          f"{'copied / AdamW':>16s}{'in place / AdamW':>18s}")
    for name in names:
        c, i = ms[f"{name}[copied]"], ms[f"{name}[in place]"]
        print(f"{name:22s}{c:10.2f}{i:10.2f}{i / c:19.2f}{c / ref:16.2f}{i / ref:18.2f}")
    print(f"torch's fused AdamW: {ref:.2f} ms")
    del entries


def sweep(names: list[str], rounds: int, steps: int) -> None:
    """In place against copied for equal tensors of 2^17 to 2^21 entries (2^24 in all): where
    the kernel call per tensor starts to beat the copy."""
    print(f"\n== threshold sweep: equal tensors, 16.8M entries in all; in place / copied, median of "
          f"{rounds} rounds of {steps} steps ==")
    print(f"{'optimizer':22s}" + "".join(f"{'2^' + str(e):>9s}" for e in range(17, 22)))
    for name in names:
        cells = []
        for e in range(17, 22):
            torch.manual_seed(0)
            start = [torch.randn(2**e) for _ in range(2 ** (24 - e))]
            grads = [torch.randn(2**e) for _ in range(2 ** (24 - e))]
            fused = functools.partial(OPTIMIZERS[name], fused=True)
            in_place = make(fused, start, grads, {"cpu": 1})             # every tensor read in place
            copied = make(fused, start, grads, {})
            a, b = [], []
            for _ in range(rounds):
                a.append(timed(in_place, steps))
                b.append(timed(copied, steps))
            cells.append(statistics.median(a) / statistics.median(b))
            del in_place, copied
        print(f"{name:22s}" + "".join(f"{c:9.2f}" for c in cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(OPTIMIZERS), help="comma-separated: " + ", ".join(OPTIMIZERS))
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3, help="steps per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sweep", action="store_true", help="also time equal tensors of 2^17 to 2^21 entries")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = args.only.split(",")
    bad = [n for n in names if n not in OPTIMIZERS]
    if bad:
        ap.error(f"unknown optimizer(s) {bad}; choose from {sorted(OPTIMIZERS)}")
    workloads = args.workloads.split(",")
    bad = [w for w in workloads if w not in WORKLOADS]
    if bad:
        ap.error(f"unknown workload(s) {bad}; choose from {sorted(WORKLOADS)}")
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, float32; "
          f"READ_IN_PLACE = {fused_module.READ_IN_PLACE}")
    for workload in workloads:
        run(workload, names, args.rounds, args.steps)
    if args.sweep:
        sweep(names, args.rounds, args.steps)


if __name__ == "__main__":
    main()
