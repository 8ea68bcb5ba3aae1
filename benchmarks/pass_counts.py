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

Memory (after ``--time``, or alone with ``--scratch-only``): every registered optimizer on one
(2048, 4096) float32 tensor (32 MiB: the scratch pool's threshold), in bytes per parameter:
its state, the scratch its eager step holds between steps (``optforge.scratch.held_bytes``,
whole and in chunks) and the peak temporaries of a step (the profiler's allocation peak plus
the scratch held). Matrix preconditioners are computed once within the first steps
(``MATRIX_KWARGS``), so that their factorizations of that size run in reasonable time.

    python benchmarks/pass_counts.py
    python benchmarks/pass_counts.py --time [--rounds 5] [--workloads one-big,many-small]
                                     [--only adamw,lion] [--threads 2 | --threads 1 --cpu-time]
                                     [--no-scratch]
    python benchmarks/pass_counts.py --time --scratch-only lamb,mars [--shape 2048x4096]
    python benchmarks/pass_counts.py --time --scratch-only all [--maximize-coupled]
"""

from __future__ import annotations

import argparse
import inspect
import math
import statistics
import time
from types import SimpleNamespace
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import optforge as of
from optforge import chunk_threads, eager_chunks, scratch

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


#: Options that keep a step of one large matrix affordable here: the preconditioner (roots,
#: eigenbases, projection) is computed once, within the first SCRATCH_STEPS steps, and the
#: measured step after them is a plain preconditioned step. max_iter: L-BFGS's evaluations.
MATRIX_KWARGS = {
    "shampoo": dict(precondition_frequency=3, start_preconditioning_step=3),
    "soap": dict(precondition_frequency=1000),
    "galore_adamw": dict(update_proj_gap=1000),
    "psgd_kron": dict(preconditioner_update_probability=0.0),   # updated at the first step only
    "lbfgs": dict(max_iter=3),
}
SCRATCH_STEPS = 3


def _with_gradient_temporary(info: Any) -> dict[str, Any]:
    """``maximize=True`` and coupled weight decay where the optimizer has them: each makes the
    gradient the update reads a parameter-sized temporary."""
    options = info.cls.__init__.__code__.co_varnames
    return {**({"maximize": True} if "maximize" in options else {}),
            **(dict(weight_decay_mode="coupled", weight_decay=0.1) if "weight_decay_mode" in options else {})}


def _scratch_run(info: Any, shape: tuple[int, ...],
                 extra: dict[str, Any]) -> tuple[Any, list[float], Any, torch.Tensor]:
    """An optimizer stepped SCRATCH_STEPS times on one matrix of ``shape``: (it, the step
    times, its step function, the parameter). L-BFGS steps a quadratic through a closure;
    SparseAdam gets a sparse gradient (an eighth of the rows)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape))
    kwargs = dict(lr=1e-6, **MATRIX_KWARGS.get(info.name, {}), **extra)
    if info.name == "lbfgs":
        target = torch.randn(shape)

        def closure():
            p.grad = torch.sub(p.detach(), target)
            return p.grad.square().sum() / 2
        opt = info.cls([p], **kwargs)
        step = lambda: opt.step(closure)            # noqa: E731
    else:
        if info.name == "sparse_adam":
            rows = torch.randperm(shape[0])[: shape[0] // 8].sort().values
            p.grad = torch.sparse_coo_tensor(rows[None], torch.randn(len(rows), *shape[1:]), shape,
                                             check_invariants=True, is_coalesced=True)
        else:
            p.grad = torch.randn(shape)
        opt = _eager(info.cls, [p], **kwargs)
        step = opt.step
    times = [_timed(step) for _ in range(SCRATCH_STEPS)]
    return opt, times, step, p


def print_scratch(shape: tuple[int, ...] = (2048, 4096), only: list[str] | None = None,
                  gradient_temporary: bool = False) -> None:
    """Bytes per parameter of each optimizer's state, of the scratch its eager step holds
    between steps (``optforge.scratch.held_bytes``: whole, and in chunks for the chunked
    elementwise updates), and of the peak temporaries of a step (the profiler's allocation
    peak during one more step, its chunks run in this thread, less the state it added, plus
    the scratch held).
    ``gradient_temporary``: with maximize and coupled weight decay where it has them."""
    from step_speed import peak_step_bytes, state_stats

    n = math.prod(shape)
    print(f"\none {tuple(shape)} float32 tensor ({n:,} params), {SCRATCH_STEPS} eager steps, then one "
          f"profiled{', maximize and coupled decay' if gradient_temporary else ''}; bytes per parameter "
          "(held: whole / chunked; '-': not chunked)")
    print(f"{'optimizer':22s} {'state':>6s} {'held':>13s} {'peak':>6s} {'first s':>8s} {'step s':>7s}")
    chunk, workers = eager_chunks.CHUNK, chunk_threads.MAX_WORKERS
    for info in of.list_optimizers(with_info=True):
        if only and info.name not in only:
            continue
        held = []
        try:
            chunked = eager_chunks.chunked_class(info.cls)
            for size in ((None, chunk) if chunked else (chunk,)):
                eager_chunks.CHUNK = size
                opt, times, step, p = _scratch_run(
                    info, shape, _with_gradient_temporary(info) if gradient_temporary else {})
                held.append(scratch.held_bytes(opt) / n)
            state_before = state_stats(opt, [p])[0]
            # the state a step adds (L-BFGS's history) is state, not a temporary; the chunks
            # run in this thread: the profiler sees its own thread's allocations only
            chunk_threads.MAX_WORKERS = 1
            peak = peak_step_bytes(SimpleNamespace(step=step)) / n + held[-1]
            state = state_stats(opt, [p])[0]
            peak -= state - state_before
        finally:
            eager_chunks.CHUNK, chunk_threads.MAX_WORKERS = chunk, workers
        held_text = " / ".join(f"{h:.1f}" for h in held) if chunked else f"- / {held[0]:.1f}"
        print(f"{info.name:22s} {state:6.2f} {held_text:>13s} {peak:6.2f} {times[0]:8.2f} "
              f"{statistics.median(times[1:]):7.2f}", flush=True)
        del opt, step, p


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
    ap.add_argument("--scratch-only", help="comma list of optimizers (or 'all'): only their state, "
                    "held scratch and peak step temporaries")
    ap.add_argument("--shape", default="2048x4096", help="the matrix of --scratch-only, e.g. 1024x2048 (the "
                    "pool takes temporaries of at least optforge.scratch.MIN_BYTES, 32 MiB)")
    ap.add_argument("--maximize-coupled", action="store_true", help="--scratch-only with maximize=True "
                    "and coupled weight decay where the optimizer has them")
    args = ap.parse_args()
    if not (args.time or args.scratch_only):
        print_counts()
        return
    torch.set_num_threads(args.threads)
    if args.cpu_time:
        if args.threads != 1:
            ap.error("--cpu-time needs --threads 1 (other threads' time is not counted)")
        global _clock
        _clock = time.thread_time
    if args.scratch_only:
        only = None if args.scratch_only == "all" else args.scratch_only.split(",")
        print_scratch(tuple(int(x) for x in args.shape.split("x")), only, args.maximize_coupled)
        return
    for name in args.workloads.split(","):
        time_workload(name, args.rounds, args.only.split(",") if args.only else None)
    if not args.no_scratch:
        print_scratch()


if __name__ == "__main__":
    main()
