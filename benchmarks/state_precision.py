#!/usr/bin/env python
"""Low-bit optimizer state (``state_precision``): memory, fidelity, training quality, speed.

Sections (each prints a Markdown table; docs/memory.md shows the results):

- ``bytes``: optimizer state bytes per parameter, every elementwise optimizer and precision
  (SGD with momentum 0.9),
  on a 1,180,800-parameter model (Linear(1024, 1024) + Linear(1024, 128)), after one step.
  Every storage reachable from the state counts once, so a view into a larger buffer counts
  the whole buffer.
- ``fidelity``: AdamW (lr 1e-3, weight decay 0.01) for 200 minibatch steps on a regression
  task (an MLP 256-512-64 fitting a random teacher network); the distance of the final
  parameters to float32 AdamW's, relative to how far float32 AdamW moved them. With
  bitsandbytes' and torchao's 8-bit, 4-bit and FP8 AdamW on the same run when installed.
- ``quality``: a compare task's MLP (``--task digits``: 64-128-10, batch 64; ``mnist1d``: the
  paper's MLP, batch 100), AdamW, Lion, AdEMAMix, Adan, ADOPT, AdaBelief and Compass with
  float32, int8 and int4 state (the default ``min_quantized_size``; ``--min-quantized-size 0``
  makes every tensor's state low-bit), 3 seeds: test accuracy and final train loss, each
  against float32's; ``--save`` keeps the runs (curves included), ``--load`` reports saved
  ones merged, ``--plot`` draws the curves.
- ``codes``: the measurements behind the codes optforge picks: the fidelity of int8 and int4
  AdamW with other codes for the first and second moment (power 1 is a linear code, power 2
  spends the levels near zero; SR is stochastic rounding), the digits quality of int4
  with nearest and stochastic rounding of the signed states, and the MNIST-1D quality of int4
  with the second moment rounded to nearest or stochastically and AdEMAMix's slow average in
  int4 or int8.
- ``speed``: ``opt.step()`` time on one 4096 x 4096 float32 tensor (16.8M parameters),
  2 threads, a fixed random gradient: optforge AdamW eager (``fused=False``) and fused with
  float32 state and each of ``--precisions``, torch's fused AdamW, bitsandbytes' and torchao's
  8-bit AdamW; entries interleaved in rounds, the median step of each (wall clock and process
  CPU time) as a ratio to optforge AdamW ``fused=True`` (torch's fused kernel) and eager in
  float32, the peak resident memory a step adds (Linux: the high-water mark, reset before
  each step) and the scratch buffers the optimizer keeps between steps.

    python benchmarks/state_precision.py bytes fidelity        # a few minutes on 2 cores
    python benchmarks/state_precision.py quality --steps 1000 --save digits.json --plot digits.png
    python benchmarks/state_precision.py quality --task mnist1d --steps 2000 --optimizers adamw,lion \\
        --save a.json      # then: quality --load a.json b.json --plot mnist1d.png
    python benchmarks/state_precision.py speed --rounds 7 --precisions int8 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import optforge as of
from optforge import scratch
from optforge.lowbit import PRECISIONS, LowBitState, formats
from optforge.lowbit.codes import Code, PowerCode

THREADS = 2
ALL = (None, *PRECISIONS)


def label(precision: str | None) -> str:
    return precision or "float32"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def elementwise() -> list[str]:
    """Registered optimizers that low-bit state supports (elementwise, scalars + kernel)."""
    return [i.name for i in of.list_optimizers(with_info=True) if i.elementwise and i.cls.has_kernel()]


# ---- bytes ----------------------------------------------------------------------------------
def state_bytes(opt: torch.optim.Optimizer) -> int:
    seen, total = set(), 0
    for st in opt.state.values():
        for x in st.values():
            parts = [x.codes, x.scales] if isinstance(x, LowBitState) else [x]
            for t in parts:
                if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in seen:
                    seen.add(t.untyped_storage().data_ptr())
                    total += t.untyped_storage().nbytes()
    return total


def bytes_section(_: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 128))
    n = sum(p.numel() for p in model.parameters())
    model(torch.randn(4, 1024)).sum().backward()
    rows = []
    for name in elementwise():
        row = [name]
        for precision in ALL:
            params = [nn.Parameter(p.detach().clone()) for p in model.parameters()]
            for p, q in zip(params, model.parameters()):
                p.grad = q.grad.clone()
            kwargs = dict(momentum=0.9) if name == "sgd" else {}   # SGD keeps no state without momentum
            opt = of.create_optimizer(params, name, state_precision=precision, **kwargs)
            opt.step()
            row.append(f"{state_bytes(opt) / n:.3f}")
        rows.append(row)
    print(f"state bytes per parameter ({n:,} parameters, default min_quantized_size)\n")
    print(table(["optimizer", *map(label, ALL)], rows))


# ---- fidelity -------------------------------------------------------------------------------
def regression_task(steps: int) -> tuple[Callable[[], nn.Module], Callable[[int], tuple]]:
    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 64))

    torch.manual_seed(123)
    teacher = nn.Sequential(nn.Linear(256, 128), nn.Tanh(), nn.Linear(128, 64))

    def batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(t)
        x = torch.randn(64, 256, generator=g)
        with torch.no_grad():
            return x, teacher(x) + 0.1 * torch.randn(64, 64, generator=g)

    return model, batch


def train_params(model: nn.Module, opt: torch.optim.Optimizer, batch: Callable,
                 steps: int) -> tuple[torch.Tensor, float]:
    for t in range(1, steps + 1):
        x, y = batch(t)
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), loss.item()


def reference_adamw() -> dict[str, Callable]:
    """bitsandbytes' and torchao's low-bit AdamW, where installed."""
    out: dict[str, Callable] = {}
    if importlib.util.find_spec("bitsandbytes"):
        import bitsandbytes as bnb

        out["bitsandbytes AdamW8bit"] = bnb.optim.AdamW8bit
    if importlib.util.find_spec("torchao"):
        from torchao.optim import AdamW4bit, AdamW8bit, AdamWFp8

        out.update({"torchao AdamW8bit": AdamW8bit, "torchao AdamW4bit": AdamW4bit,
                    "torchao AdamWFp8": AdamWFp8})
    return out


def fidelity_section(args: argparse.Namespace) -> None:
    make, batch = regression_task(args.fidelity_steps)
    start = torch.cat([p.detach().reshape(-1) for p in make().parameters()])
    kw = dict(lr=1e-3, weight_decay=0.01)
    model = make()
    reference = torch.optim.AdamW(model.parameters(), **kw)
    ref, ref_loss = train_params(model, reference, batch, args.fidelity_steps)
    entries: dict[str, Callable] = {f"optforge AdamW {label(p)}": (
        lambda ps, p=p: of.AdamW(ps, **kw).configure(state_precision=p)) for p in ALL}
    entries.update({k: (lambda ps, cls=cls: cls(ps, **kw)) for k, cls in reference_adamw().items()})
    rows = []
    for name, build in entries.items():
        model = make()
        params, loss = train_params(model, build(model.parameters()), batch, args.fidelity_steps)
        distance = ((params - ref).norm() / (ref - start).norm()).item()
        rows.append([name, f"{distance:.4f}", f"{loss:.4f}"])
    print(f"distance to float32 torch AdamW after {args.fidelity_steps} steps "
          f"(its final loss {ref_loss:.4f})\n")
    print(table(["optimizer", "relative distance", "final loss"], rows))


# ---- quality --------------------------------------------------------------------------------
QUALITY_OPTIMIZERS = ("adamw", "lion", "ademamix", "adan", "adopt", "adabelief", "compass")
QUALITY_PRECISIONS = ("float32", "int8", "int4")


def quality_runs(args: argparse.Namespace) -> dict:
    """Train every optimizer of ``--optimizers`` with every precision of ``--precisions``:
    per run its seed, test accuracy, final train loss and curves (JSON-ready)."""
    import json

    from optforge.compare.runner import Settings, train_run
    from optforge.compare.tasks import get_task

    task = get_task(args.task, "mlp")
    data = task.load()
    settings = Settings(steps=args.steps, batch_size=task.batch_size, log_every=50,
                        eval_every=max(args.steps // 20, 1), target=None)
    out: dict = dict(task=args.task, steps=args.steps, min_quantized_size=args.min_quantized_size, runs={})
    for name in args.optimizers.split(","):
        info = of.get_optimizer_info(name)
        lr = info.compare_lr or info.defaults.get("lr", 1e-3)
        for precision in (args.precisions or ",".join(QUALITY_PRECISIONS)).split(","):
            hp = dict(lr=lr, state_precision=None if precision == "float32" else precision,
                      min_quantized_size=args.min_quantized_size)
            runs = [train_run(task, data, name, hp, seed, settings) for seed in range(args.seeds)]
            out["runs"].setdefault(name, {})[precision] = [dict(
                seed=r.seed, test_accuracy=r.final_test_metric, final_train_loss=r.final_train_loss,
                train_loss=r.train_loss, val_accuracy=r.val_metric) for r in runs]
            done = ", ".join(f"{r.final_test_metric:.2f} / {r.final_train_loss:.4f}" for r in runs)
            print(f"  {name} {precision}: {done}", flush=True)
            if args.save:                  # as it goes: a long run stopped early keeps what it did
                with open(args.save, "w") as f:
                    json.dump(out, f)
    return out


def quality_merged(paths: list[str]) -> dict:
    """Runs saved by ``--save`` (e.g. optimizers run in separate processes), merged: they must
    share the task, the steps and the threshold."""
    import json

    merged: dict | None = None
    for path in paths:
        with open(path) as f:
            res = json.load(f)
        if merged is None:
            merged = res
            continue
        for key in ("task", "steps", "min_quantized_size"):
            if res[key] != merged[key]:
                raise ValueError(f"{path}: {key} is {res[key]!r}, not {merged[key]!r} as in {paths[0]}")
        for name, by_precision in res["runs"].items():
            merged["runs"].setdefault(name, {}).update(by_precision)
    return merged


def quality_table(res: dict) -> str:
    """Test accuracy (mean ±sd over seeds, difference to float32) / final train loss (its
    relative difference to float32), per optimizer and precision."""
    precisions = [p for p in QUALITY_PRECISIONS if any(p in r for r in res["runs"].values())]
    rows = []
    for name, by_precision in res["runs"].items():
        row, base = [name], None
        for precision in precisions:
            runs = by_precision.get(precision)
            if not runs:
                row.append("")
                continue
            accs = [r["test_accuracy"] for r in runs]
            acc, loss = statistics.mean(accs), statistics.mean(r["final_train_loss"] for r in runs)
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            if precision == "float32":
                base = (acc, loss)
                row.append(f"{acc:.2f} ±{spread:.2f} / {loss:.4f}")
            elif base is None:
                row.append(f"{acc:.2f} ±{spread:.2f} / {loss:.4f}")
            else:
                row.append(f"{acc:.2f} ±{spread:.2f} ({acc - base[0]:+.2f}) / {loss:.4f} "
                           f"({100 * (loss / base[1] - 1):+.0f} %)")
        rows.append(row)
    return table(["optimizer", *precisions], rows)


def quality_plot(res: dict, path: str) -> None:
    """Train loss (log scale) and validation accuracy against step, one panel pair per
    optimizer, one colour per precision (the mean over seeds)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(res["runs"])
    fig = Figure(figsize=(3.2 * len(names), 5.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(names), squeeze=False)
    for col, name in enumerate(names):
        for i, precision in enumerate(QUALITY_PRECISIONS):
            runs = res["runs"][name].get(precision)
            if not runs:
                continue
            for row, key in enumerate(("train_loss", "val_accuracy")):
                steps = runs[0][key]["step"]
                mean = [statistics.mean(r[key]["value"][j] for r in runs) for j in range(len(steps))]
                axes[row][col].plot(steps, mean, color=f"C{i}", lw=1.2, label=precision)
        axes[0][col].set_title(name)
        axes[0][col].set_yscale("log")
        late = [v for p in res["runs"][name].values() for r in p
                for v in r["val_accuracy"]["value"][len(r["val_accuracy"]["value"]) // 3:]]
        if late:
            axes[1][col].set_ylim(min(late) - 1, max(late) + 1)
        axes[1][col].set_xlabel("step")
        for ax in axes[:, col]:
            ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("train loss (mean of 50 steps)")
    axes[1][0].set_ylabel("validation accuracy %")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{res['task']} MLP, {res['steps']} steps, min_quantized_size={res['min_quantized_size']}: "
                 "mean over seeds")
    fig.savefig(path, dpi=90)


def quality_section(args: argparse.Namespace) -> None:
    import json

    res = quality_merged(args.load) if args.load else quality_runs(args)
    if args.save:
        with open(args.save, "w") as f:
            json.dump(res, f)
    if args.plot:
        quality_plot(res, args.plot)
    seeds = len(next(iter(next(iter(res["runs"].values())).values())))
    print(f"\n{res['task']} MLP, {res['steps']} steps, {seeds} seeds, min_quantized_size="
          f"{res['min_quantized_size']}: test accuracy % ±sd over seeds (vs float32) / final train loss "
          "(vs float32)\n")
    print(quality_table(res))


# ---- speed ----------------------------------------------------------------------------------
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def peak_added_mib(step: Callable[[], None]) -> float:
    """Resident memory a call adds at its peak (Linux: reset the high-water mark first)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return float("nan")
    before = _rss_kib("VmRSS")
    step()
    return (_rss_kib("VmHWM") - before) / 1024


def speed_section(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    shape = (4096, 4096)
    builders: dict[str, Callable] = {
        "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, fused=True),
        "optforge AdamW eager float32": lambda ps: of.AdamW(ps, fused=False),
        "optforge AdamW fused float32": lambda ps: of.AdamW(ps, fused=True),
    }
    for p in (args.precisions or ",".join(PRECISIONS)).split(","):
        builders[f"optforge AdamW eager {p}"] = (
            lambda ps, p=p: of.AdamW(ps, fused=False).configure(state_precision=p))
        builders[f"optforge AdamW fused {p}"] = (
            lambda ps, p=p: of.AdamW(ps, fused=True).configure(state_precision=p))
    refs = reference_adamw()
    for name in ("bitsandbytes AdamW8bit", "torchao AdamW8bit"):
        if name in refs:
            builders[name] = lambda ps, cls=refs[name]: cls(ps)
    g = torch.Generator().manual_seed(0)
    entries = {}
    for name, build in builders.items():
        w = nn.Parameter(torch.randn(shape, generator=g))
        w.grad = torch.randn(shape, generator=g)
        opt = build([w])
        for _ in range(2):   # warm-up: state, compiles
            opt.step()
        entries[name] = (opt, [], [], [])
    names = list(entries)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            opt, times, cpu, peaks = entries[name]
            t0, c0 = time.perf_counter(), time.process_time()
            peaks.append(peak_added_mib(opt.step))
            cpu.append(time.process_time() - c0)
            times.append(time.perf_counter() - t0)
    base = statistics.median(entries["optforge AdamW fused float32"][1])
    eager_base = statistics.median(entries["optforge AdamW eager float32"][1])
    rows = []
    for name, (opt, times, cpu, peaks) in entries.items():
        t = statistics.median(times)
        held = scratch.held_bytes(opt) / 2**20 if isinstance(opt, of.Optimizer) else 0.0
        rows.append([name, f"{t * 1e3:.0f}", f"{statistics.median(cpu) * 1e3:.0f}", f"{t / base:.2f}",
                     f"{t / eager_base:.2f}", f"{max(peaks):.0f}", f"{held:.0f}"])
    n = shape[0] * shape[1]
    print(f"opt.step() on one {shape[0]} x {shape[1]} tensor ({n / 1e6:.1f}M parameters), "
          f"{args.threads} threads, {args.rounds} rounds (load average before: {os.getloadavg()[0]:.1f})\n")
    print(table(["entry", "median ms", "CPU ms", "vs optforge fused float32", "vs optforge eager float32",
                 "peak MiB added by a step", "scratch MiB held between steps"], rows))


# ---- codes ----------------------------------------------------------------------------------
@contextlib.contextmanager
def codes_as(precision: str, **codes: Code):
    """Low-bit state of ``precision`` coded with other codes (state kind -> code), for the duration."""
    kinds = formats.CODES[precision]
    saved = dict(kinds)
    kinds.update(codes)
    try:
        yield
    finally:
        kinds.update(saved)


def power_code(bits: int, block: int, power: int, signed: bool, stochastic: bool = False) -> PowerCode:
    scale = torch.bfloat16 if bits == 4 and block < 128 else torch.float32
    name = f"int{bits}-{'s' if signed else 'u'}-p{power}-b{block}{'-sr' if stochastic else ''}"
    return PowerCode(name, bits, block, power, signed, stochastic, scale_dtype=scale)


def same(a: Code, b: Code) -> bool:
    def key(c: Code) -> tuple:
        return c.bits, c.block, c.power, c.signed, c.stochastic, c.scale_dtype
    return key(a) == key(b)


def codes_section(args: argparse.Namespace) -> None:
    make, batch = regression_task(args.fidelity_steps)
    start = torch.cat([p.detach().reshape(-1) for p in make().parameters()])
    kw = dict(lr=1e-3, weight_decay=0.01)
    model = make()
    ref, _ = train_params(model, torch.optim.AdamW(model.parameters(), **kw), batch, args.fidelity_steps)
    variants = [("int8", power_code(8, 256, pm, True), power_code(8, 256, pv, False))
                for pm in (1, 2) for pv in (1, 2)]
    variants += [("int4", power_code(4, block, pm, True, sr), power_code(4, block, pv, False))
                 for block in (128, 64) for pm in (1, 2) for sr in (False, True) for pv in (1, 2)]
    variants += [("int4", power_code(4, 64, 1, True, True), power_code(4, 64, pv, False, True))
                 for pv in (1, 2)]
    rows = []
    for precision, signed, non_negative in variants:
        with codes_as(precision, signed=signed, sign=signed, non_negative=non_negative):
            model = make()
            opt = of.AdamW(model.parameters(), **kw).configure(state_precision=precision)
            params, _ = train_params(model, opt, batch, args.fidelity_steps)
        distance = ((params - ref).norm() / (ref - start).norm()).item()
        chosen = formats.CODES[precision]
        ours = same(signed, chosen["signed"]) and same(non_negative, chosen["non_negative"])
        mark = " (optforge)" if ours else ""
        rows.append([precision + mark, signed.name, non_negative.name, f"{distance:.4f}"])
    print(f"AdamW fidelity with other codes (distance to float32 after {args.fidelity_steps} steps)\n")
    print(table(["precision", "first moment", "second moment", "relative distance"], rows))

    from optforge.compare.runner import Settings, train_run
    from optforge.compare.tasks import get_task

    task = get_task("digits", "mlp")
    data = task.load()
    settings = Settings(steps=args.steps, batch_size=64, log_every=50, eval_every=args.steps,
                        target=None)
    rows = []
    for name in ("adamw", "lion", "adan", "compass"):
        info = of.get_optimizer_info(name)
        lr = info.compare_lr or info.defaults.get("lr", 1e-3)
        row = [name]
        for stochastic in (None, False, True):
            signed = power_code(4, 64, 1, True, bool(stochastic))
            with codes_as("int4", signed=signed, sign=signed):
                hp = dict(lr=lr, state_precision=None if stochastic is None else "int4", min_quantized_size=0)
                runs = [train_run(task, data, name, hp, seed, settings) for seed in range(args.seeds)]
            row.append(f"{statistics.mean(r.final_test_metric for r in runs):.2f} / "
                       f"{statistics.mean(r.final_train_loss for r in runs):.4f}")
        rows.append(row)
    print(f"\nint4 signed states rounded to nearest or stochastically: digits MLP, {args.steps} steps, "
          f"{args.seeds} seeds, test accuracy % / final train loss\n")
    print(table(["optimizer", "float32", "int4 nearest", "int4 stochastic"], rows))
    int4_averages(args)


def int4_averages(args: argparse.Namespace) -> None:
    """MNIST-1D (default threshold): int4's second moment rounded to nearest or stochastically,
    and AdEMAMix's slow average (beta3 = 0.9999) in int4 or int8."""
    from optforge.compare.runner import Settings, train_run
    from optforge.compare.tasks import get_task

    task = get_task("mnist1d", "mlp")
    data = task.load()
    settings = Settings(steps=2000, batch_size=task.batch_size, log_every=50, eval_every=2000, target=None)
    chosen = formats.CODES["int4"]
    nearest = power_code(4, 64, 2, False)
    variants = [("adamw", "float32", None), ("adamw", "second moment nearest", dict(non_negative=nearest)),
                ("adamw", "second moment stochastic (optforge)", {}),
                ("ademamix", "float32", None),
                ("ademamix", "slow average int4, second moment nearest",
                 dict(slow=chosen["signed"], non_negative=nearest)),
                ("ademamix", "slow average int4", dict(slow=chosen["signed"])),
                ("ademamix", "slow average int8, second moment nearest", dict(non_negative=nearest)),
                ("ademamix", "slow average int8 (optforge)", {})]
    rows = []
    for name, what, codes in variants:
        info = of.get_optimizer_info(name)
        hp = dict(lr=info.compare_lr or info.defaults.get("lr", 1e-3),
                  state_precision=None if codes is None else "int4")
        with codes_as("int4", **(codes or {})):
            runs = [train_run(task, data, name, hp, seed, settings) for seed in range(args.seeds)]
        rows.append([name, what, f"{statistics.mean(r.final_test_metric for r in runs):.2f}",
                     f"{statistics.mean(r.final_train_loss for r in runs):.4f}"])
        print(f"  {name} {what}: {rows[-1][2]} / {rows[-1][3]}", flush=True)
    print(f"\nint4 averages: MNIST-1D MLP, 2000 steps, {args.seeds} seeds, default min_quantized_size\n")
    print(table(["optimizer", "int4 codes", "test accuracy %", "final train loss"], rows))


SECTIONS = dict(bytes=bytes_section, fidelity=fidelity_section, quality=quality_section, codes=codes_section,
                speed=speed_section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="+", choices=list(SECTIONS))
    parser.add_argument("--fidelity-steps", type=int, default=200)
    parser.add_argument("--steps", type=int, default=1000, help="quality: training steps")
    parser.add_argument("--seeds", type=int, default=3, help="quality: seeds")
    parser.add_argument("--task", default="digits", choices=["digits", "mnist1d"],
                        help="quality: the compare task (its MLP)")
    parser.add_argument("--min-quantized-size", type=int, default=4096,
                        help="quality: tensors below this keep full-precision state (the default's)")
    parser.add_argument("--optimizers", default=",".join(QUALITY_OPTIMIZERS), help="quality: which")
    parser.add_argument("--save", help="quality: write the runs (curves included) to this JSON file")
    parser.add_argument("--load", nargs="+", help="quality: report saved runs (merged) instead of training")
    parser.add_argument("--plot", help="quality: draw the curves into this PNG file")
    parser.add_argument("--rounds", type=int, default=5, help="speed: timed rounds")
    parser.add_argument("--threads", type=int, default=THREADS, help="speed: torch threads")
    parser.add_argument("--precisions", help="comma-separated; quality: of float32, int8, int4 (default: "
                        "all three); speed: the low-bit precisions to time (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)     # the speed section sets its own; the others' numbers do not depend on it
    for name in args.sections:
        SECTIONS[name](args)
        print()


if __name__ == "__main__":
    main()
