"""The bucket structure of a param group, kept from one step to the next.

Sorting a group's parameters into (device, dtype) buckets and collecting their state costs a
few Python operations per parameter; with thousands of small tensors that is more time than
the update itself. A :class:`Plan` remembers the result, and the next step only checks, with
one C-level pass per item, that it still holds:

- the group holds the same parameter objects, the same ones have gradients, and every
  parameter's memory is where it was (``p.data = ...``, moving a model, the fused path's flat
  buffers: all change ``data_ptr``);
- the optimizer's state dicts are the same objects, in the same order (``load_state_dict``,
  ``opt.state[p] = ...`` and new state of another group change them), the group's state names
  and precision options are unchanged.

Anything else rebuilds the plan (``Optimizer._entries`` + ``Optimizer._bucket``, with all their
checks). Gradients and the state columns (``s``, ``steps``) are read afresh every step, so a
new ``p.grad`` tensor (``zero_grad()`` sets them to None) or a replaced state tensor is seen.
Complex and DTensor (FSDP2, tensor parallel: no ``data_ptr``) buckets, and optimizers that
override ``_entries`` or ``_bucket``, are not planned.
"""

from __future__ import annotations

from itertools import repeat
from operator import attrgetter, is_, is_not, itemgetter
from typing import Any

from torch import Tensor

from .distributed import is_dtensor
from .tensorlist import TensorList

__all__ = ["Plan", "forget", "plan_for", "remember"]

_ATTR = "_optforge_step_plans"
_grad_of = attrgetter("grad")
_is_sparse = attrgetter("is_sparse")
_STEP = itemgetter("step")


def _options(opt: Any, group: dict[str, Any]) -> tuple:
    """What the bucket layout depends on besides the tensors."""
    return (opt.state_names_for(group), group.get("fp32_state"), group.get("stochastic_rounding"),
            bool(group.get("fused")))


class _Slot:
    """One cached bucket: which gradients are its, and what does not change between steps."""

    __slots__ = ("bucket", "index", "names")

    def __init__(self, bucket: Any, index: list[int] | None) -> None:
        self.bucket = bucket
        self.index = index                 # positions in the with-grad list; None: all of them
        self.names = tuple(bucket.s)


class Plan:
    """A group's buckets as of the step that built them."""

    __slots__ = ("group_params", "has_grad", "ptrs", "state_map", "state_dicts", "options", "slots")

    def __init__(self, opt: Any, group: dict[str, Any], buckets: list[Any]) -> None:
        self.group_params = list(group["params"])
        grads = list(map(_grad_of, self.group_params))
        self.has_grad = list(map(is_not, grads, repeat(None)))
        params = [p for p, has in zip(self.group_params, self.has_grad) if has]
        self.ptrs = list(map(Tensor.data_ptr, params))
        self.state_map = opt.state
        # every state dict of the optimizer, in order: compared by identity, with no hashing
        self.state_dicts = list(opt.state.values())
        self.options = _options(opt, group)
        position = {id(p): i for i, p in enumerate(params)}
        self.slots = [_Slot(b, None if len(buckets) == 1 else [position[id(p)] for p in b.params])
                      for b in buckets]

    def buckets(self, opt: Any, group: dict[str, Any]) -> list[Any] | None:
        """This step's buckets (fresh gradients and state columns), or None if the plan is stale."""
        params = group["params"]
        if len(params) != len(self.group_params) or not all(map(is_, params, self.group_params)):
            return None
        if opt.state is not self.state_map or _options(opt, group) != self.options:
            return None
        grads = list(map(_grad_of, params))
        if list(map(is_not, grads, repeat(None))) != self.has_grad:
            return None
        if len(grads) != len(self.ptrs):
            grads = [g for g in grads if g is not None]
        with_grad = (params if len(grads) == len(params)
                     else [p for p, has in zip(params, self.has_grad) if has])
        if list(map(Tensor.data_ptr, with_grad)) != self.ptrs:
            return None
        if len(opt.state) != len(self.state_dicts) or not all(map(is_, opt.state.values(), self.state_dicts)):
            return None
        if any(map(_is_sparse, grads)) and not opt.supports_sparse:
            return None                     # rebuilt by _entries, which refuses them
        out = []
        try:
            for slot in self.slots:
                b = slot.bucket
                b.g = TensorList(grads) if slot.index is None else TensorList([grads[i] for i in slot.index])
                b.s = {name: TensorList(map(itemgetter(name), b.states)) for name in slot.names}
                b.steps = list(map(_STEP, b.states))
                b.sparse = opt.supports_sparse and any(map(_is_sparse, b.g))
                out.append(b)
        except KeyError:                    # a state entry was removed: rebuild (creating it)
            return None
        return out


def plan_for(opt: Any) -> dict[int, Plan]:
    """The plans of ``opt``'s groups, by ``id(group)`` (each plan checks its group's identity)."""
    plans = opt.__dict__.get(_ATTR)
    if plans is None:
        plans = opt.__dict__[_ATTR] = {}
    return plans


def remember(opt: Any, group: dict[str, Any], buckets: list[Any]) -> None:
    """Keep ``buckets`` (just built for ``group``) for the next steps, unless one is complex."""
    plans = plan_for(opt)
    live = {id(g) for g in opt.param_groups}
    for stale in [k for k in plans if k not in live]:    # groups replaced by load_state_dict
        del plans[stale]
    if buckets and not any(b.is_complex or any(map(is_dtensor, b.params)) for b in buckets):
        plans[id(group)] = Plan(opt, group, buckets)
    else:
        plans.pop(id(group), None)


def forget(opt: Any) -> None:
    """Drop every plan (state converted in place by ``configure``, or replaced by
    ``load_state_dict``: the plans would keep the old tensors alive)."""
    opt.__dict__.pop(_ATTR, None)
