"""`TensorList`: a list of tensors whose methods each issue one `torch._foreach_*` kernel.

It lets an update rule read like the paper's algorithm box while running multi-tensor:
``m.lerp_(g, 1 - b1)`` is ``torch._foreach_lerp_(m, g, 1 - b1)`` over every tensor of a
(device, dtype) bucket. Scalar arguments may be one number for all tensors or a list with
one number per tensor (e.g. per-tensor bias corrections).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Union

import torch
from torch import Tensor

from . import scratch as _scratch
from .distributed import check_same_layout, full_norms, is_dtensor, local

Scalar = Union[float, int]
Operand = Union["TensorList", Sequence[Tensor], Scalar, Sequence[Scalar]]

__all__ = ["TensorList", "numbers_on"]

#: From this size on, a tensor's own kernel costs little beside its pass over memory.
_LARGE_BYTES = 2**20
#: From this size on, one clamp_ of a tensor costs less than foreach's two passes (clamp_min_,
#: clamp_max_): on the 2-core CPU, five 256 KiB tensors took 26 us one by one and 41 us in two
#: foreach passes, five 64 KiB ones 11.5 and 11.1 us.
_CLAMP_ALONE_BYTES = 2**16
_PLAIN = (Tensor, torch.nn.Parameter)


def _is_tensors(x: object) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and isinstance(x[0], Tensor)


def _nth(arg: Any, i: int) -> Any:
    """Tensor i's operand: arg[i] of a per-tensor list, else arg itself."""
    return arg[i] if isinstance(arg, (list, tuple)) else arg


def _pick(arg: Any, idx: list[int]) -> Any:
    return [arg[i] for i in idx] if isinstance(arg, (list, tuple)) else arg


def _indices_by_value(values: Sequence[Scalar]) -> dict[Scalar, list[int]]:
    """The tensors of each distinct per-tensor number. Ops whose foreach form takes one number
    (``alpha``) run once per value (steps differ in a bucket: a few values), so a tensor's
    result never depends on its neighbours: add(g, alpha=a) rounds once, add(g * a) twice."""
    by_value: dict[Scalar, list[int]] = {}
    for i, v in enumerate(values):
        by_value.setdefault(v, []).append(i)
    return by_value


def _fits(x: Tensor, operand: Any) -> bool:
    """Whether ``op(x, operand)`` has x's dtype and shape, so that ``out=`` a buffer like x
    neither casts nor resizes."""
    if isinstance(operand, Tensor) and operand.dim() != 0 and operand.shape != x.shape:
        return False
    return torch.result_type(x, operand) == x.dtype


def numbers_on(numbers: Sequence[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``numbers`` as a 1-d tensor on ``device``. On CUDA the copy starts from pinned memory and
    is queued behind the device's work: from pageable memory (``torch.tensor(..., device=...)``)
    it would wait for all of it (the backward pass), every step."""
    if device.type == "cuda":
        return torch.tensor(numbers, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
    return torch.tensor(numbers, dtype=dtype, device=device)


class TensorList(list):
    """A ``list[Tensor]`` with foreach arithmetic. In-place methods end in ``_`` and return self."""

    #: ``with TensorList.scratch(optimizer):`` an eager step whose large CPU temporaries reuse
    #: the optimizer's buffers (optforge.scratch)
    scratch = staticmethod(_scratch.using)

    # out-of-place: each returns a new TensorList (in an eager step, a large CPU tensor's result
    # may be a reused scratch buffer: see optforge.scratch)
    def clone(self) -> TensorList:
        return self._new(lambda xs: [t.clone(memory_format=torch.preserve_format) for t in xs],
                         lambda x, out: out.copy_(x))

    def neg(self) -> TensorList:
        return self._new(torch._foreach_neg, torch.neg)

    def sqrt(self) -> TensorList:
        return self._new(torch._foreach_sqrt, torch.sqrt)

    def abs(self) -> TensorList:
        return self._new(torch._foreach_abs, torch.abs)

    def sign(self) -> TensorList:
        return self._new(torch._foreach_sign, torch.sign)

    def add(self, other: Operand, alpha: Scalar | Sequence[Scalar] = 1) -> TensorList:
        """self + alpha * other; ``alpha`` may be one number per tensor."""
        if _is_tensors(other) and isinstance(alpha, (list, tuple)):
            out = TensorList(self)
            for a, idx in _indices_by_value(alpha).items():
                part = TensorList(self[i] for i in idx).add([other[i] for i in idx], alpha=a)
                for i, r in zip(idx, part):
                    out[i] = r
            return out
        if _is_tensors(other):
            try:
                return self._new(torch._foreach_add, torch.add, other, alpha=alpha)
            except RuntimeError:
                if not any(x.is_sparse for x in self):
                    raise
            # a sparse gradient plus a dense tensor (coupled weight decay, Nesterov): ATen has
            # add(dense, sparse) only, so alpha * other + self, a dense result
            return TensorList(o.mul(alpha).add_(x) if x.is_sparse and not o.is_sparse
                              else x.add(o, alpha=alpha) for x, o in zip(self, other))
        return self._new(torch._foreach_add, torch.add, other)

    def sub(self, other: Operand, alpha: Scalar = 1) -> TensorList:
        if _is_tensors(other):
            return self._new(torch._foreach_sub, torch.sub, other, alpha=alpha)
        return self._new(torch._foreach_sub, torch.sub, other)

    def mul(self, other: Operand) -> TensorList:
        return self._new(torch._foreach_mul, torch.mul, other)

    def div(self, other: Operand) -> TensorList:
        return self._new(torch._foreach_div, torch.div, other)

    def addcmul(self, t1: Sequence[Tensor], t2: Sequence[Tensor], value: Scalar = 1) -> TensorList:
        """self + value * t1 * t2, as a new list."""
        return self._new(torch._foreach_addcmul, torch.addcmul, t1, t2, value=value)

    def _new(self, foreach: Callable[..., list[Tensor]], single: Callable[..., Tensor], *args: Any,
             **kwargs: Any) -> TensorList:
        """``foreach(self, *args, **kwargs)`` as a TensorList. In an eager optimizer step, the
        tensors the scratch pool takes get ``single(x, *their args, out=buffer)`` instead: the
        same CPU kernel (foreach on CPU runs it per tensor), into reused memory."""
        pool = _scratch.active()
        pooled = [] if pool is None else pool.pooled(self)
        if not pooled:
            return TensorList(foreach(self, *args, **kwargs))
        out = TensorList(self)
        rest = sorted(set(range(len(self))) - set(pooled))
        if rest:
            results = foreach([self[i] for i in rest], *(_pick(a, rest) for a in args), **kwargs)
            for i, r in zip(rest, results):
                out[i] = r
        for i in pooled:
            x, xargs = self[i], [_nth(a, i) for a in args]
            if not all(_fits(x, a) for a in xargs):
                out[i] = foreach([x], *([a] for a in xargs), **kwargs)[0]
            else:
                out[i] = single(x, *xargs, **kwargs, out=pool.take(x))
        return out

    def norm(self, ord: Scalar = 2) -> TensorList:
        """Per-tensor norms (a list of 0-d tensors), each over the whole tensor: a DTensor's
        (FSDP2, tensor parallel) is reduced over every shard (``optforge.distributed.full_norms``)."""
        return TensorList(full_norms(self, ord))

    # in-place
    def add_(self, other: Operand, alpha: Scalar | Sequence[Scalar] = 1) -> TensorList:
        """self += alpha * other; ``alpha`` may be one number per tensor. A zero alpha is a no-op."""
        if _is_tensors(other):
            if isinstance(alpha, (list, tuple)):
                for a, idx in _indices_by_value(alpha).items():
                    if a != 0:
                        torch._foreach_add_([self[i] for i in idx], [other[i] for i in idx], alpha=a)
            elif alpha != 0:
                torch._foreach_add_(self, other, alpha=alpha)
        else:
            torch._foreach_add_(self, other)
        return self

    def sub_(self, other: Operand, alpha: Scalar = 1) -> TensorList:
        if _is_tensors(other):
            torch._foreach_sub_(self, other, alpha=alpha)
        else:
            torch._foreach_sub_(self, other)
        return self

    def mul_(self, other: Operand) -> TensorList:
        torch._foreach_mul_(self, other)
        return self

    def div_(self, other: Operand) -> TensorList:
        torch._foreach_div_(self, other)
        return self

    def rdiv_(self, numerator: Sequence[Tensor]) -> TensorList:
        """self <- numerator / self, in self's memory: a quotient that needs no temporary beside
        its denominator. Large plain tensors are divided one by one with ``out=`` (the same
        kernel as foreach on CPU); the others through a foreach quotient copied back."""
        large = [i for i, x in enumerate(self)
                 if type(x) in _PLAIN and x.numel() * x.element_size() >= _LARGE_BYTES]
        for i in large:
            torch.div(numerator[i], self[i], out=self[i])
        rest = sorted(set(range(len(self))) - set(large)) if large else range(len(self))
        if rest:
            mine = TensorList(self[i] for i in rest)
            mine.copy_(torch._foreach_div([numerator[i] for i in rest], list(mine)))
        return self

    def lerp_(self, end: Sequence[Tensor], weight: Scalar) -> TensorList:
        torch._foreach_lerp_(self, end, weight)
        return self

    def addcmul_(self, t1: Sequence[Tensor], t2: Sequence[Tensor], value: Operand = 1) -> TensorList:
        torch._foreach_addcmul_(self, t1, t2, value)
        return self

    def addcdiv_(self, t1: Sequence[Tensor], t2: Sequence[Tensor], value: Operand = 1) -> TensorList:
        """self += value * t1 / t2. A zero value (all zeros) is a no-op."""
        if any(value) if isinstance(value, (list, tuple)) else value != 0:
            torch._foreach_addcdiv_(self, t1, t2, value)
        return self

    def maximum_(self, other: Sequence[Tensor]) -> TensorList:
        torch._foreach_maximum_(self, other)
        return self

    def minimum_(self, other: Sequence[Tensor]) -> TensorList:
        torch._foreach_minimum_(self, other)
        return self

    def sqrt_(self) -> TensorList:
        torch._foreach_sqrt_(self)
        return self

    def sign_(self) -> TensorList:
        torch._foreach_sign_(self)
        return self

    def clamp_(self, min: Scalar | Sequence[Scalar], max: Scalar | Sequence[Scalar]) -> TensorList:
        """Clamp into [min, max] (one number each, or one per tensor); NaN stays NaN. Foreach has
        no two-sided clamp: tensors of 64 KiB or more (one pass each matters there) are clamped one
        by one, the rest in two foreach passes."""
        small = [i for i, x in enumerate(self) if x.numel() * x.element_size() < _CLAMP_ALONE_BYTES]
        for i, x in enumerate(self):
            if x.numel() * x.element_size() >= _CLAMP_ALONE_BYTES:
                x.clamp_(_nth(min, i), _nth(max, i))
        if small:
            mine = [self[i] for i in small]
            torch._foreach_clamp_min_(mine, _pick(min, small))
            torch._foreach_clamp_max_(mine, _pick(max, small))
        return self

    def clamp_min_(self, min: Scalar) -> TensorList:
        torch._foreach_clamp_min_(self, min)
        return self

    def neg_(self) -> TensorList:
        torch._foreach_neg_(self)
        return self

    def reciprocal_(self) -> TensorList:
        torch._foreach_reciprocal_(self)
        return self

    def zero_(self) -> TensorList:
        torch._foreach_zero_(self)
        return self

    def copy_(self, src: Sequence[Tensor]) -> TensorList:
        if any(is_dtensor(x) for x in self):        # DTensor has no rule for _foreach_copy_
            for x, y in zip(self, src):
                check_same_layout(x, y)
            torch._foreach_copy_([local(x) for x in self], [local(y) for y in src])
        else:
            torch._foreach_copy_(self, src)
        return self

    def select(self, mask: Sequence[bool]) -> TensorList:
        """The tensors where ``mask`` is true (views of the same tensors, not copies)."""
        return TensorList(t for t, keep in zip(self, mask) if keep)
