"""Memory traffic of one eager step: tensor reads + writes per parameter, counted and timed.

Counted (the default): the parameter-sized operands of every ATen kernel one eager step runs
(a TorchDispatchMode, one tensor of 4,099 entries, and one of a chunk's 262,144, each run
whole: tensors of 1 MiB and more take a few one-kernel paths, e.g. a two-sided clamp). An
in-place kernel reads and writes its first tensor (``copy_``/``zero_``/``fill_`` only write
it); an out-of-place one writes its result; ``out=`` writes ``out``. The minimum is one
pass: read the parameter, its gradient and each state tensor once, write the parameter and
each state tensor once (what a fused kernel does).

Timed (``--time``): each elementwise optimizer's eager step on the shared ``one-big`` and
``many-small`` workloads, run whole (``optforge.eager_chunks.CHUNK = None``) and in chunks
(the default), its ``fused=True`` step (the generated one-pass kernel, or torch's own where the
optimizer has one; it also copies the gradients into its flat buffer) and torch's fused AdamW,
interleaved in rounds with a bandwidth probe (``dst.copy_(src)`` over as many entries as the
workload: one read + one write each). "Effective accesses" = step time / (probe time / 2): the
accesses per parameter a step would make if it ran at the probe's bandwidth. Printed as a
markdown table (docs/benchmarks.md).

Also the scratch each holds between steps (``optforge.scratch.held_bytes``, bytes per
parameter, one (2048, 4096) tensor: 32 MiB, the pool's threshold), for every registered
optimizer but those whose matrix factorizations of that size are too slow to run here.

    python benchmarks/pass_counts.py
    python benchmarks/pass_counts.py --time [--rounds 5] [--workloads one-big,many-small]
                                     [--only adamw,lion] [--threads 2 | --threads 1 --cpu-time]
                                     [--no-scratch]
    python benchmarks/pass_counts.py --time --scratch-only lamb,mars
"""

from __future__ import annotations

import argparse
import inspect
import math
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import optforge as of
from optforge import eager_chunks, scratch

N = 4099          # a size no scalar or factored state has
LARGE = eager_chunks.CHUNK or 2**18   # one chunk of a large bucket (1 MiB in float32)
SHAPES = {
    "one-big": [(4096, 8192)],
    "many-small": [(384, 128), (384,), (128, 128), (128,), (512, 128), (512,), (128, 512), (128,),
                   (128,), (128,), (128,), (128,)] * 25,
}


class _Counter(TorchDispatchMode):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.reads = self.writes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        schema = func._schema
        n = self.n
        big = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor) and a.numel() == n]
        written = [a for arg, value in zip(schema.arguments, list(args) + [kwargs.get(a.name) for a in
                                                                            schema.arguments[len(args):]])
                   if arg.alias_info is not None and arg.alias_info.is_write
                   for a in tree_flatten(value)[0] if isinstance(a, torch.Tensor) and a.numel() == n]
        name = func.__name__.split(".")[0]
        only_written = name in ("copy_", "zero_", "fill_", "_foreach_copy_", "_foreach_zero_") \
            or func.__name__.endswith(".out")
        self.reads += len(big) - (len(written) if only_written else 0)
        if written:
            self.writes += len(written)
        else:
            results = tree_flatten(out)[0]
            self.writes += sum(1 for r in results if isinstance(r, torch.Tensor) and r.numel() == n)
        return out


def _eager(cls, params, **kwargs):
    eager = {"fused": False} if "fused" in cls.__init__.__code__.co_varnames else {}
    return cls(params, **eager, **kwargs)


def count(cls, n: int = N, **kwargs) -> tuple[int, int]:
    """(accesses per parameter of one eager step after the first on one tensor of ``n`` entries,
    the one-pass minimum)."""
    p = torch.nn.Parameter(torch.randn(n))
    opt = _eager(cls, [p], **kwargs)
    for _ in range(2):
        p.grad = torch.randn(n)
        opt.step()
    p.grad = torch.randn(n)
    counter = _Counter(n)
    with counter:
        opt.step()
    states = sum(1 for x in opt.state[p].values() if isinstance(x, torch.Tensor) and x.numel() == n)
    return counter.reads + counter.writes, 2 + 2 * states + 1


def _elementwise():
    return [i for i in of.list_optimizers(with_info=True) if i.elementwise and i.cls.has_kernel()]


def print_counts() -> None:
    """A markdown table: accesses on a small tensor and on one of a chunk's size (tensors of
    1 MiB and more take a few one-kernel paths: a two-sided clamp)."""
    print("| optimizer | eager accesses | in 1 MiB chunks | one pass | ratio in chunks |")
    print("|---|---|---|---|---|")
    for info in _elementwise():
        try:
            (accesses, minimum), (large, _) = count(info.cls, lr=1e-3), count(info.cls, LARGE, lr=1e-3)
        except (TypeError, ValueError) as e:
            print(f"| {info.name} | skipped: {e} |")
            continue
        print(f"| {info.name} | {accesses} | {large} | {minimum} | {large / minimum:.2f} |")


_clock = time.perf_counter


def _timed(fn) -> float:
    start = _clock()
    fn()
    return _clock() - start


def _copies(params: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    out = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, g in zip(out, grads):
        p.grad = g
    return out


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def time_workload(name: str, rounds: int, only: list[str] | None = None) -> None:
    """Effective accesses per parameter of each elementwise optimizer's eager step (whole and
    in chunks) and of its ``fused=True`` step (one pass, plus a copy of the gradients), against
    the counted and the minimum ones, and each eager step's time over the fused one; with
    torch's fused AdamW for reference. A markdown table."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES[name]]
    grads = [torch.randn(s) for s in SHAPES[name]]
    for p, g in zip(params, grads):
        p.grad = g
    n = sum(p.numel() for p in params)
    src, dst = torch.randn(n), torch.empty(n)
    reference = torch.optim.AdamW(_copies(params, grads), lr=1e-6, fused=True)
    chunk = eager_chunks.CHUNK
    print(f"\n{name}: {len(params)} tensors, {n:,} params, chunk {chunk:,} entries, {rounds} rounds, "
          "median. x = effective accesses / min, effective accesses = step time / (copy probe "
          "time / 2); eager/fused = chunked eager time / the same optimizer's fused=True time "
          "(* torch's own fused kernel, else the generated one)\n")
    print(_row(["optimizer", "counted", "min", "whole", "chunked", "fused", "chunked / fused",
                "ms whole", "ms chunked", "ms fused"]))
    print(_row(["---"] * 10))
    probe, ref_times = [], []
    for info in _elementwise():
        if only and info.name not in only:
            continue
        accesses, minimum = count(info.cls, lr=1e-3)
        # one optimizer per variant: a step keeps only the scratch buffers it used, so a whole
        # step after a chunked one of the same optimizer would allocate its buffers again
        whole, chunked = _eager(info.cls, params, lr=1e-6), _eager(info.cls, params, lr=1e-6)
        fused = (info.cls(_copies(params, grads), lr=1e-6, fused=True)
                 if "fused" in inspect.signature(info.cls).parameters else None)
        variants = {"whole": whole.step, "chunked": chunked.step, "reference": reference.step}
        if fused is not None:
            variants["fused"] = fused.step
        times: dict[str, list[float]] = {k: [] for k in variants}
        try:
            for k, step in variants.items():    # state, compilation, the pool's buffers
                eager_chunks.CHUNK = None if k == "whole" else chunk
                step()
                step()
            for r in range(rounds):
                probe.append(_timed(lambda: dst.copy_(src)))
                order = list(variants)
                for k in order[r % len(order):] + order[:r % len(order)]:
                    eager_chunks.CHUNK = None if k == "whole" else chunk
                    times[k].append(_timed(variants[k]))
        finally:
            eager_chunks.CHUNK = chunk
        ref_times += times.pop("reference")
        access = statistics.median(probe) / 2
        ms = {k: statistics.median(v) for k, v in times.items()}
        x = {k: f"{v / access / minimum:.2f}x" for k, v in ms.items()}
        native = fused is not None and fused.native_fused(fused.param_groups[0])
        print(_row([info.name, str(accesses), str(minimum), x["whole"], x["chunked"],
                    x.get("fused", "-") + ("*" if native else ""),
                    f"{ms['chunked'] / ms['fused']:.2f}" if "fused" in ms else "-",
                    f"{ms['whole'] * 1e3:.1f}", f"{ms['chunked'] * 1e3:.1f}",
                    f"{ms['fused'] * 1e3:.1f}" if "fused" in ms else "-"]), flush=True)
        del whole, chunked, fused, variants
    ref = statistics.median(ref_times)
    print(f"\ntorch.optim.AdamW(fused=True): {ref * 1e3:.1f} ms, "
          f"{ref / (statistics.median(probe) / 2) / 7:.2f}x its minimum of 7 accesses; "
          f"copy probe: {statistics.median(probe) * 1e3:.1f} ms for {n:,} entries "
          f"({8 * n / statistics.median(probe) / 1e9:.1f} GB/s read + write)")


def print_scratch(shape: tuple[int, ...] = (2048, 4096), steps: int = 3,
                  only: list[str] | None = None) -> None:
    """Bytes per parameter of scratch each optimizer's eager step holds between steps."""
    print(f"\nscratch held between steps, bytes per parameter, one ({shape[0]}, {shape[1]}) tensor, "
          f"after {steps} eager steps (whole / in chunks):")
    n = math.prod(shape)
    p = torch.nn.Parameter(torch.randn(shape))
    p.grad = torch.randn(shape)
    chunk = eager_chunks.CHUNK
    for info in of.list_optimizers(with_info=True):
        if info.name in ("lbfgs", "sparse_adam", "soap", "shampoo", "kron", "galore") or (
                only and info.name not in only):
            continue      # a closure / sparse gradients; matrix factorizations of this size: too slow
        held = []
        try:
            for size in (None, chunk):
                eager_chunks.CHUNK = size
                with torch.no_grad():
                    p.normal_()
                opt = _eager(info.cls, [p], lr=1e-6)
                for _ in range(steps):
                    opt.step()
                held.append(scratch.held_bytes(opt) / n)
                del opt
        finally:
            eager_chunks.CHUNK = chunk
        print(f"{info.name:22s} {held[0]:5.1f} / {held[1]:5.1f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--time", action="store_true", help="time the steps and report scratch")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workloads", default="one-big,many-small")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cpu-time", action="store_true",
                    help="with --threads 1: time this thread's CPU time, not wall time (a loaded "
                         "machine deschedules it; caches and memory are still shared)")
    ap.add_argument("--only", help="comma list of optimizers to time (default: every elementwise one)")
    ap.add_argument("--no-scratch", action="store_true")
    ap.add_argument("--scratch-only", help="comma list of optimizers: only their held scratch")
    args = ap.parse_args()
    if not args.time:
        print_counts()
        return
    torch.set_num_threads(args.threads)
    if args.cpu_time:
        if args.threads != 1:
            ap.error("--cpu-time needs --threads 1 (other threads' time is not counted)")
        global _clock
        _clock = time.thread_time
    if args.scratch_only:
        print_scratch(only=args.scratch_only.split(","))
        return
    for name in args.workloads.split(","):
        time_workload(name, args.rounds, args.only.split(",") if args.only else None)
    if not args.no_scratch:
        print_scratch()


if __name__ == "__main__":
    main()
