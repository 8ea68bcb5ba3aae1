#!/usr/bin/env python
"""Optimizer steps under FSDP2 on CPU / gloo: step time per rank and bytes each rank receives
per step, for world sizes 1 (one process, plain tensors: the baseline), 2 and 4.

Entries: Muon by owner compute (optforge.distributed_matrix), Muon gathering every matrix on
every rank (``muon-gather-everywhere``: each rank ``full_tensor()``s each momentum and
orthogonalizes every matrix, the straightforward way), SOAP, Adafactor and AdamW. The params
are transformer blocks (``--blocks`` of width ``--width``, ff = 4 x width; per block qkv, out,
ff1, ff2 weights and biases, two LayerNorms: the ``many-small`` layout of the step-speed
benchmark, smaller), float32, sharded on dim 0 by ``fully_shard``; the gradients are
fixed random tensors; only ``opt.step()`` is timed (a barrier before each step; a step's time is
its slowest rank's). Bytes are counted at the collectives (gloo): what a rank receives from the
others (all-gather: the other shards; all-to-all: the other ranks' parts; all-reduce: the
ring's 2 (W-1)/W of the tensor), the mean over ranks.

    python benchmarks/distributed.py                       # worlds 1, 2, 4; < 5 min on 2 cores
    python benchmarks/distributed.py --blocks 2 --steps 3 --json runs/distributed.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

import optforge as of
from optforge.distributed import is_dtensor

ENTRIES = ("adamw", "adafactor", "muon", "muon-gather-everywhere", "soap")
THREADS = 1                 # per rank, and for one process: 2-thread BLAS on a busy 2-core machine stalls


def layout(blocks: int, width: int) -> list[tuple[int, ...]]:
    d, ff = width, 4 * width
    one = [(3 * d, d), (3 * d,), (d, d), (d,), (ff, d), (ff,), (d, ff), (d,), (d,), (d,), (d,), (d,)]
    return one * blocks


def make_optimizer(entry: str, params):
    if entry.startswith("muon"):
        return of.Muon(params, lr=0.02, ns_dtype="float32")
    return {"adamw": of.AdamW, "adafactor": of.Adafactor, "soap": of.SOAP}[entry](params)


class Traffic:
    """Bytes this rank receives in collectives, counted where the library and DTensor call them."""

    def __init__(self, world: int) -> None:
        self.world, self.bytes = world, 0

    @contextlib.contextmanager
    def counting(self):
        import torch.distributed._functional_collectives as funcol

        w = self.world
        size = lambda t: t.numel() * t.element_size()      # noqa: E731
        rules = {
            (dist, "all_to_all_single"): lambda out, inp, splits=None, *a, **k:     # less its own part
                size(out) - (splits[dist.get_rank()] if splits else out.numel() // w) * out.element_size(),
            (dist, "all_reduce"): lambda t, *a, **k: 2 * (w - 1) * size(t) // w,
            (funcol, "all_gather_single"): lambda t, *a, **k: (w - 1) * size(t),
            (funcol, "all_reduce"): lambda t, *a, **k: 2 * (w - 1) * size(t) // w,
            (funcol, "reduce_scatter_single"): lambda t, *a, **k: (w - 1) * size(t) // w,
        }
        saved = {key: getattr(*key) for key in rules}

        def counted(key, fn):
            def call(*args, **kwargs):
                self.bytes += rules[key](*args, **kwargs)
                return fn(*args, **kwargs)
            return call

        for key, fn in saved.items():
            setattr(*key, counted(key, fn))
        try:
            yield
        finally:
            for (module, name), fn in saved.items():
                setattr(module, name, fn)


@contextlib.contextmanager
def gathering_everywhere():
    """Muon's whole matrices the straightforward way: every rank gathers every matrix and
    orthogonalizes it, keeping its own shard of the result."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    import optforge.optimizers.muon as muon

    def everywhere(opt, group, params, inputs, fn, **_):
        out = []
        for p, x in zip(params, inputs):
            if not is_dtensor(x):
                out.append(fn(x[None], [opt.state[p]])[0])
                continue
            y = fn(x.full_tensor()[None], [opt.state[p]])[0]
            size, offset = compute_local_shape_and_global_offset(x.shape, x.device_mesh, x.placements)
            out.append(y[tuple(slice(o, o + n) for o, n in zip(offset, size))])
        return out

    saved, muon.map_matrices = muon.map_matrices, everywhere
    try:
        yield
    finally:
        muon.map_matrices = saved


def measure(entry: str, shapes, steps: int, world: int) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.manual_seed(0)
    holder = nn.Module()
    holder.params = nn.ParameterList(nn.Parameter(torch.randn(s) * 0.02) for s in shapes)
    grads = [torch.randn(s) for s in shapes]
    if world > 1:
        fully_shard(holder)
    params = list(holder.parameters())
    for p, g in zip(params, grads):
        p.grad = distribute_tensor(g, p.device_mesh, [Shard(0)]) if is_dtensor(p) else g
    opt = make_optimizer(entry, params)
    traffic = Traffic(world)
    times = []
    way = gathering_everywhere() if entry == "muon-gather-everywhere" else contextlib.nullcontext()
    try:
        with way:
            for k in range(steps + 2):                  # 2 warm-up steps (state, first SOAP step)
                if world > 1:
                    dist.barrier()
                start, before = time.perf_counter(), traffic.bytes
                with traffic.counting():
                    opt.step()
                took = torch.tensor(time.perf_counter() - start)
                if world > 1:
                    dist.all_reduce(took, op=dist.ReduceOp.MAX)
                if k >= 2:
                    times.append(float(took))
                    step_bytes = traffic.bytes - before
    except ValueError as err:
        return {"refused": str(err).split(":")[0]}
    received = torch.tensor(float(step_bytes))
    if world > 1:
        dist.all_reduce(received)
    return {"step_s": statistics.median(times), "bytes": float(received) / world}


def run_rank(rank: int, world: int, port: int, shapes, steps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(THREADS)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    results = {entry: measure(entry, shapes, steps, world) for entry in ENTRIES}
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


def run_world(world: int, shapes, steps: int) -> dict:
    if world == 1:
        torch.set_num_threads(THREADS)
        return {entry: measure(entry, shapes, steps, 1) for entry in ENTRIES
                if entry != "muon-gather-everywhere"}
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        out = os.path.join(tmp, "results.pt")
        mp.spawn(run_rank, args=(world, port, shapes, steps, out), nprocs=world, join=True)
        return torch.load(out, weights_only=False)


def report(results: dict, param_bytes: int) -> str:
    lines = ["| optimizer | ranks | step time per rank (s) | vs one process | received per rank per step "
             "| / param bytes |", "|---|---|---|---|---|---|"]
    for entry in ENTRIES:
        base = results[1].get(entry if entry != "muon-gather-everywhere" else "muon")
        for world, by_entry in results.items():
            got = by_entry.get(entry)
            if got is None:
                continue
            if "refused" in got:
                lines.append(f"| {entry} | {world} | refused ({got['refused']}) | | | |")
                continue
            lines.append(f"| {entry} | {world} | {got['step_s']:.4f} | {got['step_s'] / base['step_s']:.2f} "
                         f"| {got['bytes'] / 1e6:.2f} MB | {got['bytes'] / param_bytes:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    shapes = layout(args.blocks, args.width)
    param_bytes = sum(torch.Size(s).numel() for s in shapes) * 4
    results = {w: run_world(w, shapes, args.steps) for w in map(int, args.worlds.split(","))}
    print(f"{len(shapes)} tensors, {param_bytes // 4:,} params (float32), {args.steps} timed steps, "
          f"torch {torch.__version__}, {THREADS} thread per rank, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(report(results, param_bytes))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
