#!/usr/bin/env python
"""Optimizer step speed on three workloads (below), on CPU or (``--device cuda``) a GPU.

Times ``opt.step()`` only, float32, CPU with ``torch.set_num_threads(2)`` (or the GPU, each
timed step between two ``torch.cuda.synchronize()``), fixed random grads, on:

- ``many-small``: 25 transformer blocks (d=128, ff=512), 12 tensors each: 300 tensors, 4,956,800 params
- ``one-big``:    one (4096, 8192) tensor: 33,554,432 params
- ``many-tiny``:  the many-small layout with d=8, ff=32: 300 tensors, 21,800 params (pure overhead)

Entries: ``torch.optim`` AdamW / Adam / SGD(momentum=0.9) in for-loop, foreach and fused modes;
every registered optforge optimizer in eager mode, and in fused mode when its ``__init__``
accepts ``fused``; the pytorch_optimizer and timm classes whose name matches an optforge
optimizer (when those packages are installed); and a reference ``add_`` pass over the same
tensors (the bandwidth yardstick). Entries run interleaved in rounds (each round runs every
entry for a few steps, starting one entry later each round) so machine noise hits all alike;
the reported time is the median over all timed steps of an entry.

    python benchmarks/step_speed.py --json runs/step_speed.json   # full run, <= ~10 min (--time-budget)
    python benchmarks/step_speed.py --quick                        # smoke run
    python benchmarks/step_speed.py --workloads one-big --filter 'optforge.*,timm.*' --json out.json
    python benchmarks/step_speed.py --device cuda --json runs/step_speed_cuda.json

On a GPU the memory columns are the CUDA caching allocator's: "peak" is the most it had
allocated during one step beyond what it held before it, "rss" the bytes allocated by building
the entry (params, state, buffers).

See benchmarks/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fnmatch
import gc
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import optforge
from optforge import scratch
from optforge.registry import get_optimizer_info, list_optimizers

THREADS = 2
DTYPE = torch.float32
DEVICE = torch.device("cpu")  # --device
BASE_FOREACH = "torch.AdamW[foreach]"
BASE_FUSED = "torch.AdamW[fused]"
REF_ADD = "ref.add_[foreach]"
ADAMW_BYTES = 28  # AdamW float32: reads p, g, m, v and writes p, m, v = 7 x 4 bytes per param
# untimed steps after creation (the first included): timing starts at step 6, past RAdam's and
# AdaBelief's SGD phase (rho_t > 5 from t = 6) and SGD's first-step buffer copy
WARMUP_STEPS = 5
MEM_FRACTION = 0.7  # --keep auto: keep entries alive while the process uses < 70 % of MemAvailable
MIN_ROUNDS = 3  # rounds run even past the time budget
# share of --time-budget per workload (setup included), relative
BUDGET_WEIGHT = {"many-small": 1.0, "one-big": 1.4, "many-tiny": 0.6}
# Hyperparameters copied from optforge's defaults to a peer library's class of the same name
# (so e.g. both AdaBeliefs run rectified), when the peer accepts them.
SHARED_HPARAMS = ("betas", "eps", "weight_decay", "rectify", "degenerated_to_sgd", "amsgrad",
                  "momentum", "nesterov")
# torch.optim class of the same algorithm, for the "fused <= 1.05x torch fused" target
TORCH_FUSED_TWIN = {"sgd": "torch.SGD[fused]", "adam": "torch.Adam[fused]", "adamw": "torch.AdamW[fused]"}


# ---- workloads -----------------------------------------------------------------------------
def transformer_shapes(d: int, ff: int, blocks: int = 25) -> list[tuple[int, ...]]:
    """qkv W + b, out W + b, ff1 W + b, ff2 W + b, 2 LayerNorms (w, b): 12 tensors a block."""
    block = [(3 * d, d), (3 * d,), (d, d), (d,), (ff, d), (ff,), (d, ff), (d,), (d,), (d,), (d,), (d,)]
    return block * blocks


@dataclass(frozen=True)
class Workload:
    name: str
    shapes: tuple[tuple[int, ...], ...]
    n_tensors: int
    n_params: int
    steps_per_round: int  # default; --steps-per-round overrides
    rounds: int           # default; --rounds overrides


WORKLOADS = {
    w.name: w for w in (
        Workload("many-small", tuple(transformer_shapes(128, 512)), 300, 4_956_800, 3, 20),
        Workload("one-big", ((4096, 8192),), 1, 33_554_432, 2, 12),
        Workload("many-tiny", tuple(transformer_shapes(8, 32)), 300, 21_800, 20, 20),
    )
}
for _w in WORKLOADS.values():  # the counts DESIGN.md states
    assert len(_w.shapes) == _w.n_tensors, _w.name
    assert sum(math.prod(s) for s in _w.shapes) == _w.n_params, _w.name


def sync() -> None:
    """Wait for the GPU's queued work (a no-op on CPU), so a timer around it times the work."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def interleaved_medians(opts: dict[str, Any], rounds: int, steps_per_round: int,
                        before_step: Callable[[Any], None] = lambda opt: None) -> dict[str, float]:
    """Median seconds of ``opt.step()`` per entry, entries interleaved in rounds (each leads
    once in turn); ``before_step`` runs untimed before every step."""
    times: dict[str, list[float]] = {name: [] for name in opts}
    for r in range(rounds):
        order = list(opts)
        for name in order[r % len(order):] + order[:r % len(order)]:
            for _ in range(steps_per_round):
                before_step(opts[name])
                sync()
                start = time.perf_counter()
                opts[name].step()
                sync()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def make_tensors(w: Workload, seed: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=DTYPE).to(DEVICE) for s in w.shapes]


def unchanged(ts: list[Tensor], refs: list[Tensor]) -> bool:
    return all(torch.equal(t, r) for t, r in zip(ts, refs))


# ---- entries -------------------------------------------------------------------------------
@dataclass
class Entry:
    name: str          # "torch.AdamW[foreach]", "optforge.adamw[eager]", "timm.AdaBelief[foreach]", ...
    source: str        # torch | optforge | pytorch_optimizer | timm | ref
    algorithm: str     # optforge's canonical name where there is one ("adamw", "adabelief", ...)
    mode: str          # for-loop | foreach | fused | eager | default
    factory: Callable[[list[Tensor]], Any]


class AddPass:
    """Not an optimizer: ``p.add_(g)`` over the same tensors (reads p, g; writes p: 12 B/param)."""

    def __init__(self, params: list[Tensor]) -> None:
        self.params, self.state = list(params), {}

    @torch.no_grad()
    def step(self) -> None:
        torch._foreach_add_(self.params, [p.grad for p in self.params], alpha=-1e-6)


def _norm(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def _accepts(cls: type, arg: str) -> bool:
    try:
        return arg in inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False


def torch_entries() -> list[Entry]:
    out = []
    for cls, algo, kw in ((torch.optim.AdamW, "adamw", {}), (torch.optim.Adam, "adam", {}),
                          (torch.optim.SGD, "sgd", {"momentum": 0.9})):
        for mode, flag in (("for-loop", {"foreach": False}), ("foreach", {"foreach": True}),
                           ("fused", {"fused": True})):
            out.append(Entry(f"torch.{cls.__name__}[{mode}]", "torch", algo, mode,
                             lambda ps, cls=cls, kw={"lr": 1e-3, **kw, **flag}: cls(ps, **kw)))
    return out


def optforge_kwargs(info) -> dict[str, Any]:
    """Benchmark hyperparameters: the class defaults, except momentum 0.9 where the default is 0
    (so optforge SGD is the same algorithm as torch.optim.SGD(momentum=0.9))."""
    return {"momentum": 0.9} if info.defaults.get("momentum", None) == 0 else {}


def optforge_entries() -> list[Entry]:
    out = []
    for info in list_optimizers(with_info=True):
        kw = optforge_kwargs(info)
        fused = _accepts(info.cls, "fused")
        eager_kw = {**kw, "fused": False} if fused else kw
        out.append(Entry(f"optforge.{info.name}[eager]", "optforge", info.name, "eager",
                         lambda ps, c=info.cls, k=eager_kw: c(ps, **k)))
        if fused:
            out.append(Entry(f"optforge.{info.name}[fused]", "optforge", info.name, "fused",
                             lambda ps, c=info.cls, k={**kw, "fused": True}: c(ps, **k)))
        if fused and _default_is_native(info.cls, kw):
            out.append(Entry(f"optforge.{info.name}[default]", "optforge", info.name, "default",
                             lambda ps, c=info.cls, k=kw: c(ps, **k)))
    return out


def _default_is_native(cls: type, kw: dict[str, Any]) -> bool:
    """Whether the default (fused=None) runs torch's fused kernel on float32 tensors of DEVICE."""
    from optforge.paths import native_by_default

    opt = cls([torch.zeros(1, requires_grad=True, device=DEVICE)], **kw)
    return native_by_default(opt, opt.param_groups[0], (DEVICE, torch.float32))


def pytorch_optimizer_classes() -> dict[str, type]:
    try:
        import pytorch_optimizer
    except Exception:
        return {}
    return {_norm(n): c for n, c in vars(pytorch_optimizer).items()
            if inspect.isclass(c) and issubclass(c, torch.optim.Optimizer)
            and c.__module__.startswith("pytorch_optimizer")}  # not the torch.optim re-exports


def timm_classes() -> dict[str, type]:
    """timm's own optimizer classes, by lower-case name ('Legacy' dropped: RAdamLegacy -> radam).

    ``import timm`` imports its models (and torchvision); only ``timm/optim/<algo>.py`` is
    needed, so when timm is not imported yet, the modules load under an empty ``timm`` package."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return {}
    optim_dir = Path(list(spec.submodule_search_locations)[0]) / "optim"
    if "timm" not in sys.modules:
        for name, path in (("timm", optim_dir.parent), ("timm.optim", optim_dir)):
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(path)]
            sys.modules[name] = pkg
    found = {}
    for f in sorted(optim_dir.glob("*.py")):
        if f.stem.startswith("_") or "factory" in f.stem:
            continue
        try:
            mod = importlib.import_module(f"timm.optim.{f.stem}")
        except Exception:
            continue
        for n, c in vars(mod).items():
            if inspect.isclass(c) and issubclass(c, torch.optim.Optimizer) and c.__module__ == mod.__name__:
                key = _norm(n)
                found[key[: -len("legacy")] if key.endswith("legacy") else key] = c
    return found


def peer_entries() -> list[Entry]:
    """pytorch_optimizer / timm classes with the name (or an alias) of an optforge optimizer."""
    out = []
    for lib, classes in (("pytorch_optimizer", pytorch_optimizer_classes()), ("timm", timm_classes())):
        for info in list_optimizers(with_info=True):
            cls = next((classes[k] for k in map(_norm, (info.name, *info.aliases)) if k in classes), None)
            if cls is None:
                continue
            kw: dict[str, Any] = {"lr": 1e-3, **optforge_kwargs(info)}
            kw.update({k: info.defaults[k] for k in SHARED_HPARAMS
                       if k in info.defaults and _accepts(cls, k)})
            mode = "default"
            if _accepts(cls, "foreach"):
                kw["foreach"], mode = True, "foreach"
            out.append(Entry(f"{lib}.{cls.__name__}[{mode}]", lib, info.name, mode,
                             lambda ps, c=cls, k=kw: c(ps, **k)))
    return out


def all_entries(patterns: list[str]) -> list[Entry]:
    entries = torch_entries() + optforge_entries() + peer_entries()
    entries.append(Entry(REF_ADD, "ref", "add_", "foreach", AddPass))
    keep = {BASE_FOREACH, BASE_FUSED, REF_ADD}  # the yardsticks every ratio needs
    return [e for e in entries
            if e.name in keep or any(e.name.lower() == p.lower() or fnmatch.fnmatch(e.name.lower(), p.lower())
                                     for p in patterns)]


# ---- measuring -----------------------------------------------------------------------------
@dataclass
class Result:
    entry: Entry
    times: list[float] = field(default_factory=list)   # seconds, every timed step
    first_step_s: float | None = None                  # creation's first step (state init, compile)
    state_bytes_per_param: float | None = None         # all state tensors / params, after warm-up
    state_k: float | None = None                       # parameter-sized state tensors per param
    peak_extra_bytes: int | None = None                # step temporaries: allocation peak + scratch held
    scratch_bytes: int | None = None                   # optforge.scratch buffers held between steps
    resident_bytes: int | None = None                  # RSS growth from building it (params, state, buffers)
    kept: bool = True                                  # kept alive across rounds (else rebuilt each round)
    private_grads: bool = False                        # it mutates .grad, so it gets its own copy
    error: str | None = None
    live: tuple[list[Tensor], Any] | None = None       # (params, optimizer) while kept

    def median(self) -> float:
        return statistics.median(self.times)

    def quantile(self, q: float) -> float:
        xs = sorted(self.times)
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    def bytes_per_param(self) -> float:
        """Bytes one step must move per param: reads p, g and each state, writes p and each state."""
        if self.entry.name == REF_ADD:
            return 3 * DTYPE.itemsize
        return (3 + 2 * (self.state_k or 0.0)) * DTYPE.itemsize


def rss_bytes() -> int | None:
    """The process's resident memory, or on a GPU the bytes CUDA's allocator has allocated."""
    if DEVICE.type == "cuda":
        return torch.cuda.memory_allocated(DEVICE)
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def mem_available_bytes() -> int | None:
    if DEVICE.type == "cuda":
        return torch.cuda.mem_get_info(DEVICE)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """The profiler's C++ side logs start/stop lines to fd 2; hide them."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_step_bytes(opt: Any) -> int | None:
    """Peak of the bytes torch's CPU allocator handed out during one ``opt.step()`` (less what
    it freed), from the profiler's memory events: the step's temporaries, not its state. On a
    GPU: the caching allocator's peak during the step beyond what was allocated before it."""
    if DEVICE.type == "cuda":
        sync()
        before = torch.cuda.memory_allocated(DEVICE)
        torch.cuda.reset_peak_memory_stats(DEVICE)
        opt.step()
        sync()
        return torch.cuda.max_memory_allocated(DEVICE) - before
    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.json")
        with quiet_stderr():
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                opt.step()
            prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = json.load(f)["traceEvents"]
    mem = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
                 key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)))
    running = peak = 0
    for e in mem:
        running += e["args"]["Bytes"]
        peak = max(peak, running)
    return peak


def state_stats(opt: Any, params: list[Tensor]) -> tuple[float, float]:
    """(state bytes per param, parameter-sized state tensors per param); views counted once."""
    n = sum(p.numel() for p in params)
    seen, total, sized = set(), 0, 0
    for p in params:
        stack = list(getattr(opt, "state", {}).get(p, {}).values())
        while stack:
            v = stack.pop()
            if isinstance(v, dict):
                stack.extend(v.values())
            elif isinstance(v, (list, tuple)):
                stack.extend(v)
            elif torch.is_tensor(v):
                key = (v.data_ptr(), v.numel(), v.dtype)
                if key in seen:
                    continue
                seen.add(key)
                total += v.numel() * v.element_size()
                if v.numel() == p.numel():
                    sized += v.numel()
    return total / n, sized / n


class Bench:
    """One workload: its tensors, its entries' optimizers and their timings."""

    def __init__(self, w: Workload, entries: list[Entry], args: argparse.Namespace) -> None:
        self.w, self.args = w, args
        self.rounds = args.rounds or w.rounds
        self.rounds_done = 0
        self.steps = args.steps_per_round or w.steps_per_round
        self.master = make_tensors(w, seed=0)
        self.grads = make_tensors(w, seed=1)  # shared by all entries; optimizers only read them
        self.grads_ref = [g.clone() for g in self.grads]  # to detect (and undo) writes into .grad
        self.results = [Result(e) for e in entries]

    def build(self, r: Result) -> tuple[list[Tensor], Any, float]:
        params = [torch.nn.Parameter(m.clone()) for m in self.master]
        for p, g in zip(params, self.grads):
            p.grad = g.clone() if r.private_grads else g
        opt = r.entry.factory(params)
        sync()
        t0 = time.perf_counter()
        opt.step()
        sync()
        first = time.perf_counter() - t0
        if first > self.args.slow_step:
            raise RuntimeError(f"first step took {first:.1f} s (> --slow-step {self.args.slow_step:g} s): "
                               "not timed")
        for _ in range(self.args.warmup - 1):
            opt.step()
        return params, opt, first

    def setup(self, budget: int | None) -> None:
        """Build every entry once (first step, warm-up, state, memory). Keep it alive while the
        process stays under ``budget`` bytes, else it is rebuilt (and warmed up) every round."""
        biggest = 0
        for r in self.results:
            before = rss_bytes()
            try:
                params, opt, r.first_step_s = self.build(r)
                if not unchanged(self.grads, self.grads_ref):  # it wrote into .grad: give it its own
                    torch._foreach_copy_(self.grads, self.grads_ref)
                    r.private_grads = True
                    del params, opt
                    params, opt, _ = self.build(r)
                r.state_bytes_per_param, r.state_k = state_stats(opt, params)
                if not self.args.no_memory:
                    # optforge keeps big CPU temporaries between steps (optforge.scratch): what
                    # the profiler no longer sees allocated during a step, it holds instead
                    r.scratch_bytes = scratch.held_bytes(opt)
                    r.peak_extra_bytes = peak_step_bytes(opt) + r.scratch_bytes
            except Exception as exc:  # an entry that cannot run here is reported, not fatal
                r.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
                continue
            after = rss_bytes()
            if before is not None and after is not None:
                r.resident_bytes = after - before
                biggest = max(biggest, after - before)
                if self.args.keep == "none" or (self.args.keep == "auto" and budget is not None
                                                 and after + 2 * biggest > budget):
                    r.kept = False
            elif self.args.keep == "none":
                r.kept = False
            r.live = (params, opt) if r.kept else None
            del params, opt
            if not r.kept:
                gc.collect()  # optimizers can sit in reference cycles: free its memory now
        # a fused path may keep state outside opt.state (flat buffers): use its eager twin's count
        eager = {(r.entry.source, r.entry.algorithm): r.state_k for r in self.results
                 if r.entry.mode in ("eager", "foreach") and r.state_k is not None}
        for r in self.results:
            twin = eager.get((r.entry.source, r.entry.algorithm))
            if r.entry.mode == "fused" and twin is not None and (r.state_k or 0) < twin:
                r.state_k = twin

    def run(self, deadline: float = math.inf) -> None:
        """``rounds`` rounds, or fewer (at least MIN_ROUNDS) when ``deadline`` (perf_counter) passes."""
        live = [r for r in self.results if r.error is None]
        gc.disable()  # no collector pauses inside a timed step; collected between entries instead
        try:
            for k in range(self.rounds):
                if k >= min(MIN_ROUNDS, self.rounds) and time.perf_counter() > deadline:
                    break
                order = live[k % len(live):] + live[:k % len(live)]  # rotate: no fixed neighbour
                for r in order:
                    if r.error is None:
                        self._time(r)
                gc.collect()
                self.rounds_done = k + 1
        finally:
            gc.enable()
        if not unchanged(self.grads, self.grads_ref):
            print(f"WARNING [{self.w.name}]: the shared grads changed during the rounds", file=sys.stderr)

    def _time(self, r: Result) -> None:
        """One round of an entry: ``steps`` timed steps (on a fresh, warmed-up one if not kept)."""
        try:
            if r.kept:
                opt = r.live[1]
            else:
                gc.collect()
                _params, opt, _ = self.build(r)
            for _ in range(self.steps):
                sync()
                t0 = time.perf_counter()
                opt.step()
                sync()
                r.times.append(time.perf_counter() - t0)
        except Exception as exc:
            r.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]

    def free(self) -> None:
        for r in self.results:
            r.live = None
        self.master = self.grads = self.grads_ref = []
        gc.collect()


# ---- reporting -----------------------------------------------------------------------------
def target_of(r: Result, w: Workload) -> tuple[str, float, str] | None:
    """(description, limit, baseline entry) of the performance target for an optforge entry. The
    targets are for elementwise optimizers: the others (norms, matrix structure, factored
    moments) are reported by their ratios alone."""
    if r.entry.source != "optforge" or not get_optimizer_info(r.entry.algorithm).elementwise:
        return None
    scale = r.bytes_per_param() / ADAMW_BYTES
    if w.name == "many-tiny":
        return "<= 1.0x foreach", 1.0, BASE_FOREACH
    if r.entry.mode == "default":
        twin = TORCH_FUSED_TWIN.get(r.entry.algorithm)
        if twin:
            return f"<= 1.1x {twin}", 1.1, twin
        return f"<= 1.1x fused x {scale:.2f}", 1.1 * scale, BASE_FUSED
    if r.entry.mode == "fused":
        twin = TORCH_FUSED_TWIN.get(r.entry.algorithm)
        if twin:
            return f"<= 1.05x {twin}", 1.05, twin
        return f"<= 1.3x fused x {scale:.2f}", 1.3 * scale, BASE_FUSED
    return f"<= 1.0x foreach x {scale:.2f}", scale, BASE_FOREACH


def summarize(b: Bench) -> dict[str, Any]:
    w = b.w
    by_name = {r.entry.name: r for r in b.results if r.times}
    base_fe = by_name[BASE_FOREACH].median() if BASE_FOREACH in by_name else float("nan")
    base_fu = by_name[BASE_FUSED].median() if BASE_FUSED in by_name else float("nan")
    add_gbps = (by_name[REF_ADD].bytes_per_param() * w.n_params / by_name[REF_ADD].median() / 1e9
                if REF_ADD in by_name else float("nan"))
    peers: dict[str, float] = {}
    for r in b.results:
        if r.times and r.entry.source in ("pytorch_optimizer", "timm"):
            a = r.entry.algorithm
            peers[a] = min(peers.get(a, math.inf), r.median())
    rows = {}
    for r in b.results:
        row: dict[str, Any] = dict(source=r.entry.source, algorithm=r.entry.algorithm, mode=r.entry.mode,
                                   error=r.error, kept_alive=r.kept, private_grads=r.private_grads,
                                   first_step_ms=None if r.first_step_s is None else 1e3 * r.first_step_s,
                                   state_bytes_per_param=r.state_bytes_per_param,
                                   param_sized_state_tensors=r.state_k,
                                   peak_extra_bytes=r.peak_extra_bytes, scratch_bytes=r.scratch_bytes,
                                   resident_bytes_per_param=None if r.resident_bytes is None
                                   else r.resident_bytes / w.n_params)
        if r.times:
            med = r.median()
            bpp = r.bytes_per_param()
            gbps = bpp * w.n_params / med / 1e9
            row.update(median_ms=1e3 * med, p10_ms=1e3 * r.quantile(0.1), p25_ms=1e3 * r.quantile(0.25),
                       p75_ms=1e3 * r.quantile(0.75), min_ms=1e3 * min(r.times),
                       n_steps=len(r.times), times_ms=[round(1e3 * t, 4) for t in r.times],
                       ratio_foreach=med / base_fe, ratio_fused=med / base_fu,
                       bytes_per_param=bpp, gbps=gbps, frac_of_add=gbps / add_gbps)
            if r.entry.source == "optforge" and r.entry.algorithm in peers:
                row["peer_speedup"] = peers[r.entry.algorithm] / med
            tgt = target_of(r, w)
            if tgt and tgt[2] in by_name:
                ratio = med / by_name[tgt[2]].median()
                row.update(target=tgt[0], target_ratio=ratio, target_limit=tgt[1], target_met=ratio <= tgt[1])
        rows[r.entry.name] = row
    return dict(n_tensors=w.n_tensors, n_params=w.n_params, rounds=b.rounds_done,
                rounds_planned=b.rounds, steps_per_round=b.steps,
                warmup_steps=b.args.warmup, add_gbps=add_gbps, entries=rows)


def fmt(x: float | None, spec: str, missing: str = "-") -> str:
    return missing if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_workload(name: str, s: dict[str, Any]) -> None:
    print(f"\n== {name}: {s['n_tensors']} tensors, {s['n_params']:,} params, float32, {THREADS} threads; "
          f"{s['rounds']} rounds x {s['steps_per_round']} steps, median ==")
    if s["rounds"] < s["rounds_planned"]:
        print(f"(stopped after {s['rounds']} of {s['rounds_planned']} rounds: --time-budget)")
    print(f"reference add_ pass: {fmt(s['add_gbps'], '.1f')} GB/s (12 B/param)")
    head = (f"{'entry':38} {'ms':>9} {'p10 ms':>9} {'iqr%':>5} {'x foreach':>9} {'x fused':>8} "
            f"{'B/p':>4} {'GB/s':>6} {'%add_':>5} {'first ms':>9} {'peak MB':>8}  target")
    print(head)
    print("-" * len(head))
    for ename, row in s["entries"].items():
        if "median_ms" not in row:
            print(f"{ename:38} {'ERROR: ' + str(row['error']) if row['error'] else 'no timings'}")
            continue
        iqr = 100 * (row["p75_ms"] - row["p25_ms"]) / row["median_ms"]
        peak = None if row["peak_extra_bytes"] is None else row["peak_extra_bytes"] / 2**20
        tgt = ""
        if "target" in row:
            tgt = f"{row['target']}: {row['target_ratio']:.2f} {'ok' if row['target_met'] else 'MISSED'}"
        if "peer_speedup" in row:
            tgt += f"  (peer/this {row['peer_speedup']:.2f}x)"
        flags = ("" if row["kept_alive"] else " *") + (" g" if row["private_grads"] else "")
        print(f"{ename + flags:38} {row['median_ms']:9.3f} {row['p10_ms']:9.3f} {iqr:5.0f} "
              f"{row['ratio_foreach']:9.2f} {row['ratio_fused']:8.2f} {row['bytes_per_param']:4.0f} "
              f"{row['gbps']:6.1f} {100 * row['frac_of_add']:5.0f} {fmt(row['first_step_ms'], '9.1f'):>9} "
              f"{fmt(peak, '8.1f'):>8}  {tgt}")


def print_state_table(summaries: dict[str, dict[str, Any]]) -> None:
    names = _entry_names(summaries)
    wl = list(summaries)
    print("\n== memory, bytes per param: state = state tensors in opt.state after warm-up; rss = process "
          "growth from building the entry: its parameter copy, state and private buffers (shown for "
          "one-big only: small tensors reuse freed heap memory); peak = extra allocations during one "
          "step (torch CPU allocator; on a GPU, CUDA's, and rss its allocated bytes), plus the scratch "
          "buffers optforge holds between steps for large CPU temporaries (optforge.scratch) ==")
    head = f"{'entry':38}" + "".join(f" | {w[:10]:>10} state {'rss':>5} {'peak':>5}" for w in wl)
    print(head)
    print("-" * len(head))
    for n in names:
        cells = []
        for w in wl:
            row = summaries[w]["entries"].get(n, {})
            pk = row.get("peak_extra_bytes")
            pk = None if pk is None else pk / summaries[w]["n_params"]
            rss = row.get("resident_bytes_per_param") if w == "one-big" else None
            cells.append(f" | {fmt(row.get('state_bytes_per_param'), '16.2f'):>16} "
                         f"{fmt(rss, '5.1f'):>5} {fmt(pk, '5.1f'):>5}")
        print(f"{n:38}" + "".join(cells))


def print_ratio_table(summaries: dict[str, dict[str, Any]]) -> None:
    """Every entry's ratios side by side; for optforge entries, the performance-target ratio too."""
    names = _entry_names(summaries)
    wl = list(summaries)
    print("\n== summary: x torch AdamW foreach / x torch AdamW fused (same run); "
          "optforge: target ratio (limit) ==")
    head = f"{'entry':38}" + "".join(f" {w:>30}" for w in wl)
    print(head)
    print("-" * len(head))
    for n in names:
        cells = []
        for w in wl:
            row = summaries[w]["entries"].get(n, {})
            if "median_ms" not in row:
                cells.append(f" {'-':>30}")
                continue
            cell = f"{row['ratio_foreach']:.2f} / {row['ratio_fused']:.2f}"
            if "target" in row:
                mark = "" if row["target_met"] else "!"
                cell += f"  {row['target_ratio']:.2f}{mark}({row['target_limit']:.2f})"
            cells.append(f" {cell:>30}")
        print(f"{n:38}" + "".join(cells))
    print("(! = target missed; targets: eager <= foreach x B/param/28, fused <= 1.3 x fused x B/param/28 "
          "or <= 1.05 x torch's fused twin, many-tiny <= 1.0 x foreach)")


def _entry_names(summaries: dict[str, dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for s in summaries.values():
        names += [n for n in s["entries"] if n not in names]
    return names


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                  "optforge": getattr(optforge, "__version__", None)}
    for pkg in ("pytorch_optimizer", "timm"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def device_name() -> str:
    """What the tensors live on: "cpu", or the GPU's name."""
    if DEVICE.type == "cuda":
        return f"{DEVICE} ({torch.cuda.get_device_name(DEVICE)})"
    return "cpu"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", help="comma list of: " + ", ".join(WORKLOADS) + " (default: all; "
                    "--quick: many-small,many-tiny, as one-big spends most of a smoke run allocating)")
    ap.add_argument("--rounds", type=int, help="rounds per workload (default: many-small 20, one-big 12, "
                    "many-tiny 20; --quick: 2)")
    ap.add_argument("--steps-per-round", type=int, help="timed steps per entry per round (default: "
                    "many-small 3, one-big 2, many-tiny 20; --quick: 2)")
    ap.add_argument("--filter", default="*", help="comma list of wildcards on entry names, e.g. "
                    "'optforge.*,timm.*' (torch AdamW foreach/fused and the add_ pass always run)")
    ap.add_argument("--warmup", type=int, help=f"untimed steps after creating an optimizer, the first "
                    f"(timed separately: 'first ms') included (default {WARMUP_STEPS}; --quick: 1)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 rounds x 2 steps, warm-up 1, "
                    "many-small and many-tiny (numbers are rough; RAdam/AdaBelief then time their "
                    "first, SGD-like steps)")
    ap.add_argument("--cold-cache", action="store_true", help="compile into a fresh, empty inductor "
                    "cache, so 'first ms' of a compiled (fused) path is a cold compile")
    ap.add_argument("--time-budget", type=float, metavar="SECONDS",
                    help="stop a workload's rounds early (after at least 3) so the whole run takes about "
                    "this long; shared across workloads, setup included (default 540; --quick: 45)")
    ap.add_argument("--keep", choices=("auto", "all", "none"), default="auto",
                    help="keep every entry's optimizer alive across rounds (all), rebuild each per "
                    "round (none), or keep while memory allows (auto, the default)")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-step peak memory probe")
    ap.add_argument("--slow-step", type=float, default=30.0, metavar="SECONDS",
                    help="an entry whose first step takes longer is reported, not timed (matrix "
                         "optimizers on one-big: Newton-Schulz / eigendecompositions of 4096 x 8192)")
    ap.add_argument("--device", default="cpu", help="where the tensors live: cpu (default) or cuda[:N]")
    ap.add_argument("--list", action="store_true", help="print the entries and exit")
    ap.add_argument("--json", metavar="PATH", help="write every number (and each step's time) here")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds = args.rounds or 2
        args.steps_per_round = args.steps_per_round or 2
        args.warmup = args.warmup or 1
        args.time_budget = args.time_budget or 45.0
        args.workloads = args.workloads or "many-small,many-tiny"
    args.workloads = args.workloads or ",".join(WORKLOADS)
    args.time_budget = args.time_budget or 540.0
    args.warmup = max(1, WARMUP_STEPS if args.warmup is None else args.warmup)
    if args.cold_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cold-")
        os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "0"

    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type not in ("cpu", "cuda"):
        ap.error(f"--device {args.device!r}: cpu or cuda[:N]")
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device!r}: torch sees no CUDA device here")
    torch.set_num_threads(THREADS)
    entries = all_entries([p.strip() for p in args.filter.split(",") if p.strip()])
    if args.list:
        for e in entries:
            print(e.name)
        return 0
    wanted = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in WORKLOADS]
    if unknown:
        ap.error(f"unknown workload(s) {unknown}; choose from {', '.join(WORKLOADS)}")

    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), command=sys.argv,
                cpu=cpu_name(), device=device_name(), cores=os.cpu_count(), threads=torch.get_num_threads(),
                dtype=str(DTYPE),
                versions=versions(), entries=[e.name for e in entries], loadavg_start=loadavg(),
                inductor_cache=os.environ.get("TORCHINDUCTOR_CACHE_DIR", "default"))
    print(f"optforge step-speed benchmark  {meta['date']}  {meta['device']}; {meta['cpu']} "
          f"({meta['cores']} cores), {THREADS} threads")
    print("  " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    print(f"  {len(entries)} entries; times are opt.step() only; ratios are to torch AdamW foreach / "
          "fused from the same run; lower is faster")
    avail = mem_available_bytes()
    budget = None if avail is None else (rss_bytes() or 0) + int(MEM_FRACTION * avail)

    summaries: dict[str, dict[str, Any]] = {}
    t_start = time.perf_counter()
    for i, wname in enumerate(wanted):
        t0 = time.perf_counter()
        left = args.time_budget - (t0 - t_start)
        share = BUDGET_WEIGHT[wname] / sum(BUDGET_WEIGHT[w] for w in wanted[i:])
        b = Bench(WORKLOADS[wname], entries, args)
        b.setup(budget)
        b.run(deadline=t0 + max(0.0, left) * share)
        summaries[wname] = s = summarize(b)
        s["seconds"] = time.perf_counter() - t0
        b.free()
        print_workload(wname, s)
        print(f"({s['seconds']:.0f} s; * = rebuilt every round to save memory, g = mutates .grad so "
              "it got its own copy)")
    print_ratio_table(summaries)
    print_state_table(summaries)
    total = time.perf_counter() - t_start
    meta["loadavg_end"] = loadavg()
    print(f"\ntotal {total:.0f} s; load average (1 min) {fmt(meta['loadavg_start'], '.1f')} at start, "
          f"{fmt(meta['loadavg_end'], '.1f')} at end on {meta['cores']} cores")
    busy = [x for x in (meta["loadavg_start"], meta["loadavg_end"]) if x is not None]
    if busy and max(busy) > (os.cpu_count() or 1) - 0.5:
        print("WARNING: other processes were competing for the CPU: absolute times and, to a lesser "
              "extent, ratios are noisy; rerun on an idle machine", file=sys.stderr)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, seconds=total, workloads=summaries), f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
