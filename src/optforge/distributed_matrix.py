"""Whole-matrix updates (Muon, SOAP, ...) on DTensor parameters (FSDP2, tensor parallel), by
owner compute.

An optimizer whose update needs a whole matrix (an orthogonalization, an eigenbasis) sets
``Optimizer.whole_matrices = True`` and calls :func:`map_matrices` with a function of whole
matrices. Elementwise work (Muon's momentum) stays on the local shards; only the input of the
matrix function travels. For DTensor inputs:

- each matrix gets an *owner* rank of its mesh, once (it keeps it for good: owner-held state
  lives there): longest-processing-time-first greedy on :func:`matrix_cost`, so the ranks'
  costs end up balanced (same-shape matrices spread round-robin);
- per round, one ``all_to_all`` sends every rank's shard of each matrix to its owner, the owner
  assembles the matrices, runs the function on its same-shape matrices stacked (one batched
  call), and one ``all_to_all`` sends each rank its shard of each result; the next round's
  gather is in flight while a round computes;
- every rank sends and receives about ``numel / world`` per matrix and direction (the
  gather-everywhere alternative receives ``numel`` per matrix, and computes every matrix on
  every rank).

Plain tensors are computed where they are (no communication). Shards are the boxes a
DTensor's placements cut (``Shard``, FSDP2-over-TP's ``_StridedShard``, ``Replicate`` on some
mesh dims: every holder of a box gets its result back); layouts whose shards are not boxes,
``Partial`` placements and N-D meshes that do not span every rank are refused with a ValueError.

A new matrix optimizer writes its per-matrix step and nothing else::

    class MyShampoo(Optimizer):
        whole_matrices = True
        state_names = owner_state = ("L", "R")   # under FSDP2: kept whole by each matrix's owner

        def update(self, group, p, g, s, t):
            steps = map_matrices(self, group, p, g, self.preconditioned, batch=False)
            for x, d in zip(p, steps):
                local(x).add_(d, alpha=-group["lr"])     # on this rank's shard

where ``self.preconditioned(gs, states)`` maps a stack of whole gradients to whole steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import Tensor

from .distributed import is_dtensor, local
from .precision import LOW_PRECISION

__all__ = ["ROUND_NUMEL", "check_layout", "local_box", "map_matrices", "matrix_cost", "owner_of"]

#: Elements a rank owns per round (at least one matrix): bounds the memory of assembled
#: matrices and sets how finely communication overlaps compute.
ROUND_NUMEL = 1 << 24

Box = tuple[tuple[int, int], ...]       # (start, stop) along each dim of the whole tensor
MatrixFn = Callable[[Tensor, list[dict[str, Any]]], Tensor]


def matrix_cost(shape: Sequence[int]) -> int:
    """Cost of a whole-matrix update on a tensor viewed as (rows, everything else): the
    ``m n min(m, n)`` of a Newton-Schulz iteration or an SVD; ``numel`` below 2 dims."""
    if len(shape) < 2:
        return math.prod(shape)
    rows, cols = shape[0], math.prod(shape[1:])
    return rows * cols * min(rows, cols)


def map_matrices(opt: Any, group: dict[str, Any], params: Sequence[Tensor], inputs: Sequence[Tensor],
                 fn: MatrixFn, *, states: Sequence[dict[str, Any]] | None = None,
                 batch: bool = True) -> list[Tensor]:
    """``fn`` applied to the whole of each input, as each rank needs it: the local shard of each
    result (the result itself for a plain input), in the input's local shape.

    ``fn(xs, sts)`` takes a stack of same-shape whole inputs (B, ...) and their state dicts, and
    returns the stack of results (same shape); it runs once per stack on the owner of those
    matrices (``batch=False``, and for plain inputs: B = 1). A plain input's state dict is
    ``states[i]`` (default: ``opt.state[params[i]]`` where it exists); a DTensor's is
    ``opt.state[params[i]]`` on its owner, where the owner-held state (``opt.owner_state``) is
    created whole (by ``opt.init_state``) before ``fn`` first runs. Inputs holding nothing
    (0 elements) are left out: their result is empty."""
    out: list[Tensor | None] = [None] * len(inputs)
    plain: list[int] = []
    distributed: dict[Any, list[int]] = {}
    for i, x in enumerate(inputs):
        if x.numel() == 0:
            out[i] = local(x).new_empty(local(x).shape)
        elif is_dtensor(x):
            distributed.setdefault(_layout_key(type(opt).__name__, x), []).append(i)
        else:
            plain.append(i)
    for i in plain:                               # one at a time: no stacking copies
        state = opt.state.get(params[i], {}) if states is None else states[i]
        out[i] = fn(inputs[i].unsqueeze(0), [state])[0]
    for (mesh, placements, dtype), items in distributed.items():
        if any(params[i] not in opt.state for i in items):     # float32 copies, not the params
            raise ValueError(_LOW_PRECISION_REFUSAL.format(type(opt).__name__))
        owners = owner_of(opt, mesh, [params[i] for i in items])
        boxes = [_boxes(tuple(inputs[i].shape), mesh, placements) for i in items]
        results = _Exchange(opt, group, mesh, dtype, [params[i] for i in items],
                            [local(inputs[i]) for i in items], boxes, owners, fn, batch).run()
        for i, y in zip(items, results):
            out[i] = y
    return out  # type: ignore[return-value]


def owner_of(opt: Any, mesh: Any, params: Sequence[Tensor]) -> list[int]:
    """The owner of each param (a rank of the mesh's process group): assigned on first sight,
    longest first to the least-loaded rank (ties: the lowest), and kept for good."""
    owners: dict[Tensor, int] = opt.__dict__.setdefault("_matrix_owners", {})
    loads = opt.__dict__.setdefault("_matrix_loads", {}).setdefault(mesh, [0] * mesh.size())
    new = sorted({p: None for p in params if p not in owners},
                 key=lambda p: -matrix_cost(tuple(p.shape)))      # stable: ties keep param order
    for p in new:
        rank = min(range(len(loads)), key=lambda r: (loads[r], r))
        owners[p] = rank
        loads[rank] += max(1, matrix_cost(tuple(p.shape)))
    return [owners[p] for p in params]


_LOW_PRECISION_REFUSAL = ("{} does not support fp32_state or stochastic_rounding with bf16/fp16 DTensor "
                          "parameters (its whole-matrix state is keyed by the parameters): use float32 "
                          "parameters, or mixed precision that keeps them float32 (FSDP2's "
                          "MixedPrecisionPolicy)")


def check_layout(name: str, x: Tensor, group: dict[str, Any]) -> None:
    """Refuse (ValueError naming optimizer ``name`` and the mesh) a DTensor whose whole matrix
    cannot be assembled from its shards, or that would be updated as a float32 copy."""
    if x.dtype in LOW_PRECISION and (group.get("fp32_state") or group.get("stochastic_rounding")):
        raise ValueError(_LOW_PRECISION_REFUSAL.format(name))
    _layout_key(name, x)


def _layout_key(name: str, x: Tensor) -> tuple:
    mesh, placements = x.device_mesh, tuple(x.placements)
    if any(p.is_partial() for p in placements):
        raise ValueError(f"{name}: a DTensor with unreduced (Partial) placements {placements} on {mesh}: "
                         "reduce it first (redistribute to Replicate or Shard)")
    if mesh.ndim > 1 and mesh.size() != torch.distributed.get_world_size():
        raise ValueError(f"{name} needs whole matrices, gathered over the DTensor's mesh, and supports "
                         f"1-D meshes and meshes that span every rank: {mesh} has {mesh.size()} of "
                         f"{torch.distributed.get_world_size()} ranks")
    try:
        _boxes(tuple(x.shape), mesh, placements)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    return mesh, placements, x.dtype


@cache
def _boxes(shape: tuple[int, ...], mesh: Any, placements: tuple) -> tuple[Box, ...]:
    """The box of the whole tensor each rank of the mesh holds, by rank in :func:`_group`.
    ValueError where the shards are not disjoint boxes that cover the tensor (some strided
    layouts)."""
    # The private helper is the one DTensor itself uses for a rank's local shape and offset.
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    grid = mesh.mesh
    boxes: list[Box | None] = [None] * grid.numel()
    coordinates = torch.cartesian_prod(*[torch.arange(n) for n in grid.shape]).reshape(grid.numel(), -1)
    for coordinate in coordinates.tolist():
        size, offset = _compute_local_shape_and_global_offset(shape, tuple(grid.shape), coordinate,
                                                              placements)
        rank = _group_rank(mesh, int(grid[tuple(coordinate)]))
        boxes[rank] = tuple((o, o + n) for o, n in zip(offset, size))
    distinct = set(boxes)
    covered = sum(_volume(box) for box in distinct)
    if covered != math.prod(shape) or _overlap(distinct):
        raise ValueError(f"the shards of a tensor of shape {shape} with placements {placements} on {mesh} "
                         "are not disjoint boxes covering it; whole matrices cannot be assembled from them")
    return tuple(boxes)  # type: ignore[arg-type]


def local_box(x: Tensor) -> Box:
    """The box of the whole tensor that DTensor ``x``'s local shard holds."""
    return _boxes(tuple(x.shape), x.device_mesh, tuple(x.placements))[
        _group_rank(x.device_mesh, torch.distributed.get_rank())]


def _group(mesh: Any) -> Any:
    """The process group whole matrices travel in: a 1-D mesh's own, else every rank."""
    return mesh.get_group() if mesh.ndim == 1 else torch.distributed.group.WORLD


def _group_rank(mesh: Any, rank: int) -> int:
    return torch.distributed.get_group_rank(_group(mesh), rank)


def _overlap(boxes: set[Box]) -> bool:
    full = [b for b in boxes if _volume(b)]
    return any(all(a0 < b1 and b0 < a1 for (a0, a1), (b0, b1) in zip(x, y))
               for i, x in enumerate(full) for y in full[i + 1:])


def _volume(box: Box) -> int:
    return math.prod(stop - start for start, stop in box)


def _index(box: Box) -> tuple[slice, ...]:
    return tuple(slice(start, stop) for start, stop in box)


def _sizes(box: Box) -> list[int]:
    return [stop - start for start, stop in box]


def _stacks(items: list[int], shape_of: Callable[[int], Sequence[int]], batch: bool) -> list[list[int]]:
    """``items`` grouped by shape (each on its own without ``batch``)."""
    if not batch:
        return [[i] for i in items]
    by_shape: dict[tuple, list[int]] = {}
    for i in items:
        by_shape.setdefault(tuple(shape_of(i)), []).append(i)
    return list(by_shape.values())


@dataclass
class _Round:
    items: list[int]            # indices into the exchange's lists, owners ascending
    send: Tensor | None = None  # kept alive while the collective runs
    recv: Tensor | None = None
    work: Any = None
    splits: tuple[list[int], list[int]] = ([], [])


class _Exchange:
    """One call's gather -> compute -> scatter over one mesh, in rounds that overlap."""

    def __init__(self, opt, group, mesh, dtype, params, shards, boxes, owners, fn, batch):
        self.opt, self.group, self.dtype, self.fn, self.batch = opt, group, dtype, fn, batch
        self.params, self.shards, self.boxes, self.owners = params, shards, boxes, owners
        self.world = mesh.size()
        self.comm = _group(mesh)
        self.rank = torch.distributed.get_rank(self.comm)
        self.device = shards[0].device
        # A box held by several ranks (Replicate on a mesh dim) is sent by its lowest holder.
        self.sender = [[held.index(held[r]) == r for r in range(self.world)] for held in boxes]
        self.results: list[Tensor | None] = [None] * len(params)

    def run(self) -> list[Tensor]:
        rounds = self._rounds()
        if rounds:
            self._gather(rounds[0])
        scatters = []
        for k, rnd in enumerate(rounds):
            if k + 1 < len(rounds):
                self._gather(rounds[k + 1])          # in flight while this round computes
            rnd.work.wait()
            scatters.append(self._scatter(rnd, self._compute(rnd)))
        for rnd in scatters:
            rnd.work.wait()
            self._unpack_results(rnd)
        return self.results  # type: ignore[return-value]

    def _rounds(self) -> list[_Round]:
        """Each owner's matrices in order, cut so that no owner takes more than ROUND_NUMEL
        elements (or one matrix) per round."""
        queues = [[i for i, o in enumerate(self.owners) if o == r] for r in range(self.world)]
        rounds = []
        while any(queues):
            items = []
            for q in queues:
                load = 0
                while q and (load == 0 or load + self._numel(q[0]) <= ROUND_NUMEL):
                    load += self._numel(q[0])
                    items.append(q.pop(0))
            rounds.append(_Round(items))
        return rounds

    def _numel(self, i: int) -> int:
        return math.prod(self.params[i].shape)

    def _exchange(self, rnd: _Round, chunks: list[list[Tensor]], recv_sizes: list[int]) -> None:
        send_sizes = [sum(c.numel() for c in cs) for cs in chunks]
        flat = [c.reshape(-1) for cs in chunks for c in cs]
        rnd.send = torch.cat(flat) if flat else torch.empty(0, dtype=self.dtype, device=self.device)
        rnd.recv = torch.empty(sum(recv_sizes), dtype=self.dtype, device=self.device)
        rnd.splits = (recv_sizes, send_sizes)
        rnd.work = torch.distributed.all_to_all_single(rnd.recv, rnd.send, recv_sizes, send_sizes,
                                                       group=self.comm, async_op=True)

    def _gather(self, rnd: _Round) -> None:
        """Every rank sends the shards it is the sender of to their owners."""
        me = self.rank
        chunks: list[list[Tensor]] = [[] for _ in range(self.world)]
        recv = [0] * self.world
        for i in rnd.items:
            owner = self.owners[i]
            if self.sender[i][me]:
                chunks[owner].append(self.shards[i])
            if owner == me:
                for r in range(self.world):
                    if self.sender[i][r]:
                        recv[r] += _volume(self.boxes[i][r])
        self._exchange(rnd, chunks, recv)

    def _compute(self, rnd: _Round) -> dict[int, Tensor]:
        """The owner assembles its matrices of the round and runs fn on each same-shape stack."""
        mine = [i for i in rnd.items if self.owners[i] == self.rank]
        sizes = rnd.splits[0]
        starts = [sum(sizes[:r]) for r in range(self.world)]
        offset = {}                                  # where item i's shard from rank r starts
        for i in mine:
            for r in range(self.world):
                if self.sender[i][r]:
                    offset[i, r] = starts[r]
                    starts[r] += _volume(self.boxes[i][r])
        self._ensure_owner_state(mine)
        results: dict[int, Tensor] = {}
        for stack in _stacks(mine, lambda i: self.params[i].shape, self.batch):
            shape = (len(stack), *self.params[stack[0]].shape)
            whole = torch.empty(shape, dtype=self.dtype, device=self.device)
            for x, i in zip(whole, stack):           # assembled in place from the shards
                for r in range(self.world):
                    if self.sender[i][r]:
                        box = self.boxes[i][r]
                        x[_index(box)] = rnd.recv[offset[i, r]:offset[i, r] + _volume(box)].view(_sizes(box))
            ys = self.fn(whole, [self.opt.state[self.params[i]] for i in stack])
            results.update(zip(stack, ys))
        return results

    def _scatter(self, rnd: _Round, results: dict[int, Tensor]) -> _Round:
        """The owner sends each holder of each box its part of the result."""
        me = self.rank
        chunks: list[list[Tensor]] = [[] for _ in range(self.world)]
        recv = [0] * self.world
        for i in rnd.items:
            owner = self.owners[i]
            if owner == me:
                for r in range(self.world):       # fn may compute in another dtype (Muon's bf16)
                    chunks[r].append(results[i][_index(self.boxes[i][r])].to(self.dtype))
            recv[owner] += _volume(self.boxes[i][me])
        back = _Round(rnd.items)
        self._exchange(back, chunks, recv)
        return back

    def _unpack_results(self, rnd: _Round) -> None:
        at = [sum(rnd.splits[0][:r]) for r in range(self.world)]
        for i in rnd.items:
            owner, n = self.owners[i], _volume(self.boxes[i][self.rank])
            self.results[i] = rnd.recv[at[owner]:at[owner] + n].view(self.shards[i].shape)
            at[owner] += n

    def _ensure_owner_state(self, mine: list[int]) -> None:
        names = getattr(self.opt, "owner_state", ())
        for i in mine:
            p = self.params[i]
            st = self.opt.state[p]
            if any(n not in st for n in names):
                whole = torch.empty((), dtype=self.dtype, device=self.device).expand(p.shape)
                for n in names:
                    if n not in st:
                        st[n] = self.opt.init_state(self.group, whole, n)

