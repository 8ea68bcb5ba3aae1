"""`TensorList`: a list of tensors whose methods each issue one `torch._foreach_*` kernel.

It lets an update rule read like the paper's algorithm box while running multi-tensor:
``m.lerp_(g, 1 - b1)`` is ``torch._foreach_lerp_(m, g, 1 - b1)`` over every tensor of a
(device, dtype) bucket. Scalar arguments may be one number for all tensors or a list with
one number per tensor (e.g. per-tensor bias corrections).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
from torch import Tensor

Scalar = Union[float, int]
Operand = Union["TensorList", Sequence[Tensor], Scalar, Sequence[Scalar]]

__all__ = ["TensorList"]


def _is_tensors(x: object) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and isinstance(x[0], Tensor)


class TensorList(list):
    """A ``list[Tensor]`` with foreach arithmetic. In-place methods end in ``_`` and return self."""

    # out-of-place: each returns a new TensorList
    def clone(self) -> TensorList:
        return TensorList(t.clone(memory_format=torch.preserve_format) for t in self)

    def neg(self) -> TensorList:
        return TensorList(torch._foreach_neg(self))

    def sqrt(self) -> TensorList:
        return TensorList(torch._foreach_sqrt(self))

    def abs(self) -> TensorList:
        return TensorList(torch._foreach_abs(self))

    def sign(self) -> TensorList:
        return TensorList(torch._foreach_sign(self))

    def add(self, other: Operand, alpha: Scalar = 1) -> TensorList:
        if _is_tensors(other):
            return TensorList(torch._foreach_add(self, other, alpha=alpha))
        return TensorList(torch._foreach_add(self, other))

    def sub(self, other: Operand, alpha: Scalar = 1) -> TensorList:
        if _is_tensors(other):
            return TensorList(torch._foreach_sub(self, other, alpha=alpha))
        return TensorList(torch._foreach_sub(self, other))

    def mul(self, other: Operand) -> TensorList:
        return TensorList(torch._foreach_mul(self, other))

    def div(self, other: Operand) -> TensorList:
        return TensorList(torch._foreach_div(self, other))

    def norm(self, ord: Scalar = 2) -> TensorList:
        """Per-tensor norms (a list of 0-d tensors)."""
        return TensorList(torch._foreach_norm(self, ord))

    # in-place
    def add_(self, other: Operand, alpha: Scalar | Sequence[Scalar] = 1) -> TensorList:
        """self += alpha * other; ``alpha`` may be one number per tensor. A zero alpha is a no-op."""
        if _is_tensors(other):
            if isinstance(alpha, (list, tuple)):
                # One kernel per distinct alpha (steps differ in a bucket: a few values), so a
                # tensor's result never depends on its neighbours: add(g, alpha=a) rounds once,
                # add(g * a) twice.
                by_alpha: dict[Scalar, list[int]] = {}
                for i, a in enumerate(alpha):
                    by_alpha.setdefault(a, []).append(i)
                for a, idx in by_alpha.items():
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

    def sqrt_(self) -> TensorList:
        torch._foreach_sqrt_(self)
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
        torch._foreach_copy_(self, src)
        return self

    def select(self, mask: Sequence[bool]) -> TensorList:
        """The tensors where ``mask`` is true (views of the same tensors, not copies)."""
        return TensorList(t for t, keep in zip(self, mask) if keep)
