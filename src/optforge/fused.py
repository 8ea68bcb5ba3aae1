"""The fused path: one generated single-pass kernel per (device, dtype) bucket.

An optimizer that writes its update as ``scalars`` (Python math on the step count) plus an
elementwise ``kernel`` (TensorList methods only) gets ``fused=True`` for free:

- the bucket's small parameters and their state live in one flat buffer each; ``p.data`` and
  the state entries become views into them (so ``state_dict``, checkpoints and the model see
  the same tensors), and each step copies their gradients into a flat buffer. Large tensors
  (:data:`READ_IN_PLACE`, CPU) stay where they are, their gradients read in place. ``p.grad``
  is left alone either way;
- the kernel runs on :class:`FlatList` s (a single flat tensor: all the small tensors, or one
  large one) with the per-step scalars as
  0-d tensors, under ``torch.compile``, which fuses every line of the kernel, ``maximize`` and
  weight decay into one pass over memory. Hyperparameters that the kernel reads from the group
  (betas, eps, flags) are compile-time constants; ``lr`` and anything that depends on the step
  must come through ``scalars`` so a scheduler never triggers a recompile.

DTensor parameters (FSDP2, tensor parallel) stay where FSDP2 keeps them: the compiled kernel
runs on each parameter's local shard (exact, being elementwise), one call per parameter.

A step whose bucket is not uniform (a parameter without a gradient, parameters at different
step counts, non-contiguous or complex parameters) runs the eager foreach path instead: same
results, no surprises.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Sequence
from operator import is_, itemgetter
from typing import Any

import torch
from torch import Tensor

from .distributed import check_same_layout, is_dtensor, local, placed_as
from .steps import advance_steps
from .tensorlist import TensorList, numbers_on

__all__ = ["FlatBucket", "FlatList", "compiled_step"]


def _one(x: Any) -> Any:
    """The single tensor of a FlatList, or a scalar (0-d tensor or number) as is."""
    if isinstance(x, (list, tuple)):
        if len(x) != 1:
            raise ValueError(f"fused kernels take one tensor or scalar per operand, got {len(x)}")
        return x[0]
    return x


def _scaled(x: Tensor, alpha: Any) -> Tensor:
    return x if isinstance(alpha, (int, float)) and alpha == 1 else x * alpha


class FlatList(TensorList):
    """A TensorList holding one flat tensor, whose methods accept 0-d tensor scalars.

    Written with plain tensor arithmetic so that ``torch.compile`` sees one elementwise graph.
    """

    def _wrap(self, x: Tensor) -> FlatList:
        return FlatList([x])

    def clone(self) -> FlatList:
        return self._wrap(self[0].clone())

    def neg(self) -> FlatList:
        return self._wrap(-self[0])

    def sqrt(self) -> FlatList:
        return self._wrap(self[0].sqrt())

    def abs(self) -> FlatList:
        return self._wrap(self[0].abs())

    def sign(self) -> FlatList:
        return self._wrap(self[0].sign())

    def add(self, other, alpha=1) -> FlatList:
        return self._wrap(self[0] + _scaled(_one(other), alpha))

    def sub(self, other, alpha=1) -> FlatList:
        return self._wrap(self[0] - _scaled(_one(other), alpha))

    def mul(self, other) -> FlatList:
        return self._wrap(self[0] * _one(other))

    def div(self, other) -> FlatList:
        return self._wrap(self[0] / _one(other))

    def addcmul(self, t1, t2, value=1) -> FlatList:
        return self._wrap(self[0] + _one(value) * _one(t1) * _one(t2))

    def norm(self, ord=2):
        raise TypeError("norms are per tensor: an optimizer that uses them is not elementwise")

    def add_(self, other, alpha=1) -> FlatList:
        self[0].add_(_scaled(_one(other), alpha))
        return self

    def sub_(self, other, alpha=1) -> FlatList:
        self[0].sub_(_scaled(_one(other), alpha))
        return self

    def mul_(self, other) -> FlatList:
        self[0].mul_(_one(other))
        return self

    def div_(self, other) -> FlatList:
        self[0].div_(_one(other))
        return self

    # The operation orders below are ATen's, so that fused and eager round alike.
    def lerp_(self, end, weight) -> FlatList:
        x, e, w = self[0], _one(end), _one(weight)
        if isinstance(w, (int, float)):
            x.copy_(x + w * (e - x) if w < 0.5 else e - (e - x) * (1 - w))
        else:
            x.copy_(torch.where(w < 0.5, x + w * (e - x), e - (e - x) * (1 - w)))
        return self

    def addcmul_(self, t1, t2, value=1) -> FlatList:
        self[0].add_(_one(value) * _one(t1) * _one(t2))
        return self

    def addcdiv_(self, t1, t2, value=1) -> FlatList:
        self[0].add_(_one(value) * (_one(t1) / _one(t2)))
        return self

    def maximum_(self, other) -> FlatList:
        self[0].copy_(torch.maximum(self[0], _one(other)))
        return self

    def sqrt_(self) -> FlatList:
        self[0].sqrt_()
        return self

    def clamp_(self, min, max) -> FlatList:
        self[0].clamp_(min, max)
        return self

    def neg_(self) -> FlatList:
        self[0].neg_()
        return self

    def reciprocal_(self) -> FlatList:
        self[0].reciprocal_()
        return self

    def zero_(self) -> FlatList:
        self[0].zero_()
        return self

    def copy_(self, src) -> FlatList:
        self[0].copy_(_one(src))
        return self

    def select(self, mask):
        raise TypeError("a fused kernel cannot select tensors: express the choice in scalars()")


#: Parameters of at least this many entries (per device type) stay out of the flat buffers, as
#: do their state and gradient: the kernel runs on each of them in a call of its own, reading
#: ``p.grad`` in place, instead of on a copy in the flat gradient. On CPU a compiled call costs
#: 45-90 us of its own (more with more state), about the time of copying 2^18-2^19 float32
#: entries; from 2^20 entries the call won in every measurement
#: (``benchmarks/fused_grad_read.py --sweep``). Other devices copy every gradient (not
#: measured there).
READ_IN_PLACE = {"cpu": 1 << 20}


class FlatBucket:
    """Params, state and a gradient buffer of one bucket's small tensors, each in one flat
    tensor; its large tensors (:data:`READ_IN_PLACE`) stay where they are.

    Small tensors lie in the flat buffers those of one shape next to each other (in the
    bucket's order within a shape), so that each step copies their gradients in with one
    ``torch.stack`` per shape: one C++ loop over the tensors, several times faster on small
    tensors than a ``copy_`` each. Each large tensor gets a kernel call of its own, on its own
    parameter, state and gradient. ``pieces`` are the (param, state) flat tensors each kernel
    call runs on."""

    def __init__(self, params: Sequence[Tensor], states: Sequence[dict[str, Any]],
                 names: Sequence[str]) -> None:
        p0 = params[0]
        self.params = list(params)
        self.names = tuple(names)
        in_place = READ_IN_PLACE.get(p0.device.type)
        self.large = [i for i, p in enumerate(params) if in_place is not None and p.numel() >= in_place]
        large = set(self.large)
        by_shape: dict[torch.Size, list[int]] = {}
        for i, p in enumerate(params):
            if i not in large:
                by_shape.setdefault(p.shape, []).append(i)
        self.order = [i for members in by_shape.values() for i in members]
        self.offsets: dict[int, int] = {}       # where each small param starts in the flat buffers
        total = 0
        for i in self.order:
            self.offsets[i] = total
            total += params[i].numel()
        small = [params[i] for i in self.order]
        with torch.no_grad():
            self.flat_param = self._flatten(params, total, p0)
            for p, view in zip(small, self._views(self.flat_param, params)):
                p.data = view
            self.param_ptrs = list(map(Tensor.data_ptr, params))
            self.flat_state = {}
            self.state_views: dict[str, list[Tensor]] = {}
            for name in names:
                flat = self._flatten([st[name] for st in states], total, p0)
                self.flat_state[name] = flat
                for i, view in zip(self.order, self._views(flat, params)):
                    states[i][name] = view
                for i in self.large:
                    states[i][name] = _kernel_ready(states[i][name], params[i])
                self.state_views[name] = [st[name] for st in states]
            steps = torch.stack([st["step"] for st in states])
            self.flat_step = steps.clone()
            self.state_views["step"] = list(self.flat_step.unbind())
            for st, view in zip(states, self.state_views["step"]):
                st["step"] = view
        self.pieces = [(self.flat_param, self.flat_state)] if total else []
        self.pieces += [(params[i].detach().view(-1), {n: states[i][n].view(-1) for n in names})
                        for i in self.large]
        self.flat_grad = torch.zeros(total, dtype=p0.dtype, device=p0.device)
        self._grad_blocks = []                  # (grads -> those of one shape, their block of flat_grad)
        for shape, members in by_shape.items():
            start = self.offsets[members[0]]
            block = self.flat_grad[start:start + len(members) * math.prod(shape)].view(len(members), *shape)
            self._grad_blocks.append((_picker(members), block))
        self.states = list(states)
        self._known_step: tuple[int, float | None] | None = None   # (flat_step._version, step)
        # the bucket object, its state columns and steps list that is_current last found current
        self._checked: Any = None
        self._columns: list[tuple[str, list[Tensor]]] = []
        self._steps: list[Tensor] | None = None

    def uniform_step(self) -> float | None:
        """The bucket's common step count, or None if its params' counts differ. Read from the
        device only when something else changed the counts (the eager path, a checkpoint
        load: the version counter of ``flat_step`` and its views tells); else remembered, so a
        CUDA step does not wait for the device."""
        version = self.flat_step._version
        if self._known_step is None or self._known_step[0] != version:
            steps = self.flat_step.tolist()
            self._known_step = (version, steps[0] if min(steps) == max(steps) else None)
        return self._known_step[1]

    def advance_step(self, t: float) -> None:
        self.flat_step.add_(1)
        self._known_step = (self.flat_step._version, t)

    def _flatten(self, tensors: Sequence[Tensor], total: int, like: Tensor) -> Tensor:
        flat = torch.empty(total, dtype=like.dtype, device=like.device)
        if self.order:
            torch.cat([tensors[i].reshape(-1) for i in self.order], out=flat)
        return flat

    def _views(self, flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
        """Views of ``flat`` shaped as the small params, in ``order``."""
        return [flat[self.offsets[i]:self.offsets[i] + like[i].numel()].view(like[i].shape)
                for i in self.order]

    def is_current(self, bucket: Any) -> bool:
        """True while the bucket's params and their state still live in this bucket's buffers:
        the same params at the same addresses, and state entries that are still the views made
        here. O(1) for the bucket object whose state columns are the very lists found current
        last time (a kept plan has checked its params and re-read its columns this step:
        :mod:`optforge.step_plan`); else C-level passes over the tensors."""
        if bucket is self._checked and bucket.steps is self._steps and all(
                bucket.s[name] is column for name, column in self._columns):
            return True
        params, states = bucket.params, bucket.states
        if len(params) != len(self.params) or not all(map(is_, params, self.params)):
            return False
        if tuple(bucket.s) != self.names or list(map(Tensor.data_ptr, params)) != self.param_ptrs:
            return False
        try:
            if not all(all(map(is_, map(itemgetter(name), states), views))
                       for name, views in self.state_views.items()):
                return False
        except KeyError:
            return False
        self._checked, self._steps = bucket, bucket.steps
        self._columns = [(name, bucket.s[name]) for name in self.names]
        return True

    def gather_grads(self, grads: Sequence[Tensor]) -> list[Tensor]:
        """The gradient of each piece, flat: the small ones (``grads`` are the params'
        ``.grad``, or transformed ones) copied into the flat gradient, each large one as it is
        (a view; a copy only if it is not contiguous). ``p.grad`` stays the user's tensor (the
        same object, memory and autograd accumulation as without ``fused``)."""
        for pick, block in self._grad_blocks:
            torch.stack(pick(grads), out=block)
        out = [self.flat_grad] if self.flat_grad.numel() else []
        out.extend(grads[i].reshape(-1) for i in self.large)
        return out


def _kernel_ready(x: Tensor, p: Tensor) -> Tensor:
    """State entry ``x`` as the kernel reads it for ``p``: ``p``'s dtype and shape, contiguous
    (``x`` itself when it already is, as every entry the optimizer made is)."""
    y = x if x.dtype == p.dtype else x.to(p.dtype)
    y = y if y.shape == p.shape else y.reshape(p.shape)
    return y if y.is_contiguous() else y.contiguous()


def _picker(positions: list[int]) -> Callable[[Sequence[Tensor]], Sequence[Tensor]]:
    """A function picking the items at ``positions`` out of a sequence, as a tuple."""
    if len(positions) == 1:
        only = positions[0]
        return lambda xs: (xs[only],)
    return itemgetter(*positions)


def _fused_entry(kernel: Callable, consts: dict[str, Any], p: Tensor, g: Tensor,
                 state: dict[str, Tensor], c: dict[str, Tensor]) -> None:
    """maximize + weight decay + the optimizer's kernel, as one compiled graph."""
    if consts["maximize"]:
        g = -g
    mode, wd = consts["weight_decay_mode"], consts["weight_decay"]
    if wd != 0:
        if mode == "coupled":
            g = g + wd * p
        elif mode == "decoupled":
            p.mul_(c["_decay"])
        else:
            p.mul_(1 - wd)
    kernel(consts, FlatList([p]), FlatList([g]), {k: FlatList([v]) for k, v in state.items()}, c)


_COMPILED: dict[tuple, Callable] = {}


def _frozen(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return tuple(_frozen(v) for v in x)
    if isinstance(x, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in x.items()))
    return x


def compile_entry(fn: Callable) -> Callable:
    """``fn`` compiled for flat buffers of any size, its CPU loops parallel at every size.

    Without ``cpp.dynamic_threads``, Inductor makes a CPU loop serial when the sizes it first
    compiles for are small, and its caches (in memory and on disk) give that kernel to every
    later bucket of any size: a large bucket then ran on one thread (1.7x slower on two)."""
    return torch.compile(fn, dynamic=True, fullgraph=True, options={"cpp.dynamic_threads": True})


def compiled_step(cls: type, variant: Any = ()) -> Callable:
    """The compiled fused entry for an optimizer class and a ``variant`` (hashable).

    Each (class, variant) gets its own copy of the entry's code object, so torch.compile's
    per-code cache and its recompile limit (8; with ``fullgraph=True`` exceeding it is an
    error, not a fallback) are per configuration: the group constants (betas, flags, weight
    decay...) and the dtype are compile-time constants, and a sweep over them in one process
    must not run out of recompiles.
    """
    key = (cls, _frozen(variant))
    if key not in _COMPILED:
        code = _fused_entry.__code__.replace(co_name=f"_fused_{cls.__name__}")
        fn = types.FunctionType(code, _fused_entry.__globals__, code.co_name)
        _COMPILED[key] = compile_entry(fn)
    return _COMPILED[key]


def _scalar_dtype(dtype: torch.dtype) -> torch.dtype:
    # Bias corrections need more precision than bf16/fp16 offer.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kernel_scalars(opt: Any, group: dict[str, Any], t: float, like: Tensor) -> dict[str, Tensor]:
    """``scalars`` at step ``t`` (and the decoupled decay factor) as 0-d tensors."""
    c = opt.scalars(group, t)
    if group["weight_decay"] != 0 and group["weight_decay_mode"] == "decoupled":
        lr = opt.decay_lr(group, [t])
        c["_decay"] = 1 - (lr[0] if isinstance(lr, list) else lr) * group["weight_decay"]
    names = list(c)
    values = numbers_on([float(c[n]) for n in names], _scalar_dtype(like.dtype), like.device)
    return dict(zip(names, values.unbind()))


def run_generated(opt: Any, group: dict[str, Any], bucket: Any) -> bool:
    """One fused step of a bucket whose params all have gradients; False when the bucket's
    steps differ (the eager path then runs it)."""
    cache = opt.__dict__.setdefault("_flat_buckets", {})
    key = (id(group), bucket.key)
    flat = cache.get(key)
    if flat is None or not flat.is_current(bucket):
        if not all(map(Tensor.is_contiguous, bucket.params)):
            return False
        if any(map(is_dtensor, bucket.params)):
            return _run_on_shards(opt, group, bucket)
        if len({float(x) for x in bucket.steps}) != 1:
            return False     # before moving anything: the eager path runs this bucket as it is
        flat = cache[key] = FlatBucket(bucket.params, bucket.states, tuple(bucket.s))
    step = flat.uniform_step()
    if step is None:
        return False
    t = step + 1
    grads = flat.gather_grads(opt.transform_grads(group, bucket.g))
    p = flat.flat_param
    consts = opt.kernel_constants(group)
    entry = compiled_step(type(opt), (consts, p.dtype, p.device.type))
    scalars = _kernel_scalars(opt, group, t, p)
    for (param, state), g in zip(flat.pieces, grads):
        entry(type(opt).kernel, consts, param, g, state, scalars)
    flat.advance_step(t)
    return True


def _run_on_shards(opt: Any, group: dict[str, Any], bucket: Any) -> bool:
    """DTensor parameters (FSDP2, tensor parallel): the compiled kernel on each parameter's
    local shard, flattened (exact: the kernel is elementwise). One call per parameter: the
    shards' memory belongs to FSDP2, which gathers the parameters from it, so it cannot move
    into a flat buffer. False (the eager path runs it) where a shard is not contiguous."""
    states = [[bucket.s[n][i] for n in bucket.s] for i in range(len(bucket.params))]
    for p, st in zip(bucket.params, states):
        check_same_layout(p, *st)
    if not all(local(x).is_contiguous() for p, st in zip(bucket.params, states) for x in (p, *st)):
        return False
    # placed as the params (every rank, an empty shard too: a redistribution is a collective)
    grads = [placed_as(g, p) for g, p in zip(opt.transform_grads(group, bucket.g), bucket.params)]
    steps = advance_steps(bucket.steps)
    consts = opt.kernel_constants(group)
    scalars: dict[float, dict[str, Tensor]] = {}
    for p, g, st, t in zip(bucket.params, grads, states, steps):
        shard = local(p)
        if shard.numel() == 0:        # nothing here (an uneven split); no collective to keep in step
            continue
        if t not in scalars:
            scalars[t] = _kernel_scalars(opt, group, t, shard)
        entry = compiled_step(type(opt), (consts, shard.dtype, shard.device.type))
        entry(type(opt).kernel, consts, shard.view(-1), local(g).reshape(-1),
              {n: local(x).view(-1) for n, x in zip(bucket.s, st)}, scalars[t])
    return True
