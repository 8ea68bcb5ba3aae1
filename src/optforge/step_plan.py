"""The bucket structure of a param group, kept from one step to the next.

Sorting a group's parameters into (device, dtype) buckets and collecting their state costs a
few Python operations per parameter; with thousands of small tensors that is more time than
the update itself. A :class:`Plan` remembers the result, and the next step only checks, with
a few C-level passes over the tensors (no Python code runs per tensor), that it still holds:

- the group holds the same parameter objects, the same ones have gradients, none of them
  sparse, and every parameter's memory is where it was (``p.data = ...``, moving a model, the
  fused path's flat buffers: all change ``data_ptr``);
- the optimizer's state dicts are the same objects, in the same order (``load_state_dict``,
  ``opt.state[p] = ...`` and new state of another group change them: checked once per step for
  all groups), each state entry the bucket reads is the same tensor, and the group's state
  names and precision options are unchanged.

Anything else rebuilds the plan (``Optimizer._entries`` + ``Optimizer._bucket``, with all their
checks). Gradients are read afresh every step and let go of after it (a plan never keeps a
gradient alive once ``zero_grad()`` dropped it); a state column whose entries are all the
tensors of last step is the same list object as last step, so the fused path checks its flat
buffers in O(1) (:meth:`optforge.fused.FlatBucket.is_current`).
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

__all__ = ["Plan", "forget", "plan_for", "release", "remember"]

_ATTR = "_optforge_step_plans"
_STATE_ATTR = "_optforge_planned_state"      # (opt.state, its state dicts in order) as planned
_grad_of = attrgetter("grad")
_is_sparse = attrgetter("is_sparse")
_STEP = itemgetter("step")


def _options(opt: Any, group: dict[str, Any]) -> tuple:
    """What the bucket layout depends on besides the tensors."""
    return (opt.state_names_for(group), group.get("fp32_state"), group.get("stochastic_rounding"),
            bool(group.get("fused")))


def _same(xs: Any, ys: list) -> bool:
    """Whether ``xs`` (an iterable) yields exactly the objects of ``ys``, in order."""
    return all(map(is_, xs, ys))


class _Slot:
    """One cached bucket: which gradients are its, and how to read its state columns."""

    __slots__ = ("bucket", "index", "getters")

    def __init__(self, bucket: Any, index: list[int] | None) -> None:
        self.bucket = bucket
        self.index = index                 # positions in the with-grad list; None: all of them
        self.getters = [(name, itemgetter(name)) for name in bucket.s]

    def refresh(self, grads: list[Tensor]) -> None:
        """This step's gradients and state columns (KeyError: a state entry was removed).
        A column whose entries are unchanged stays the same list object."""
        b = self.bucket
        b.g = TensorList(grads) if self.index is None else TensorList([grads[i] for i in self.index])
        states = b.states
        for name, get in self.getters:
            if not _same(map(get, states), b.s[name]):
                b.s[name] = TensorList(map(get, states))
        if not _same(map(_STEP, states), b.steps):
            b.steps = list(map(_STEP, states))


class Plan:
    """A group's buckets as of the step that built them."""

    __slots__ = ("group_params", "has_grad", "all_grads", "ptrs", "options", "slots")

    def __init__(self, opt: Any, group: dict[str, Any], buckets: list[Any]) -> None:
        self.group_params = list(group["params"])
        grads = list(map(_grad_of, self.group_params))
        self.has_grad = list(map(is_not, grads, repeat(None)))
        self.all_grads = all(self.has_grad)
        params = [p for p, has in zip(self.group_params, self.has_grad) if has]
        self.ptrs = list(map(Tensor.data_ptr, params))
        self.options = _options(opt, group)
        position = {id(p): i for i, p in enumerate(params)}
        self.slots = [_Slot(b, None if len(buckets) == 1 else [position[id(p)] for p in b.params])
                      for b in buckets]

    def buckets(self, opt: Any, group: dict[str, Any]) -> list[Any] | None:
        """This step's buckets (fresh gradients and state columns), or None if the plan is stale."""
        params = group["params"]
        if len(params) != len(self.group_params) or not _same(params, self.group_params):
            return None
        if _options(opt, group) != self.options:
            return None
        grads = list(map(_grad_of, params))
        if self.all_grads:
            with_grad = params
            try:            # one pass over all of them: a missing gradient has no is_sparse
                sparse = sum(map(_is_sparse, grads)) > 0
            except AttributeError:
                return None
        else:
            if list(map(is_not, grads, repeat(None))) != self.has_grad:
                return None
            with_grad = [p for p, has in zip(params, self.has_grad) if has]
            grads = [g for g in grads if g is not None]
            sparse = any(map(_is_sparse, grads))
        if sparse and not opt.supports_sparse:
            return None                     # rebuilt by _entries, which refuses them
        if list(map(Tensor.data_ptr, with_grad)) != self.ptrs:
            return None
        try:
            for slot in self.slots:
                slot.refresh(grads)
        except KeyError:                    # a state entry was removed: rebuild (creating it)
            return None
        out = [slot.bucket for slot in self.slots]
        if opt.supports_sparse:
            for b in out:
                b.sparse = any(map(_is_sparse, b.g))
        return out


def plan_for(opt: Any) -> dict[int, Plan]:
    """The plans of ``opt``'s groups, by ``id(group)`` (each plan checks its group's identity),
    called once at the start of a step: all of them are dropped if ``opt.state`` no longer
    holds the state dicts it held when they were made."""
    plans = opt.__dict__.get(_ATTR)
    if plans is None:
        plans = opt.__dict__[_ATTR] = {}
    elif plans:
        state_map, state_dicts = opt.__dict__[_STATE_ATTR]
        state = opt.state
        if state is not state_map or len(state) != len(state_dicts) or not _same(state.values(), state_dicts):
            plans.clear()
    return plans


def remember(opt: Any, group: dict[str, Any], buckets: list[Any]) -> None:
    """Keep ``buckets`` (just built for ``group``) for the next steps, unless one is complex."""
    plans = opt.__dict__.setdefault(_ATTR, {})
    live = {id(g) for g in opt.param_groups}
    for stale in [k for k in plans if k not in live]:    # groups replaced by load_state_dict
        del plans[stale]
    if buckets and not any(b.is_complex or any(map(is_dtensor, b.params)) for b in buckets):
        plans[id(group)] = Plan(opt, group, buckets)
    else:
        plans.pop(id(group), None)
    # every state dict of the optimizer, in order: compared by identity, with no hashing
    opt.__dict__[_STATE_ATTR] = (opt.state, list(opt.state.values()))


def release(buckets: list[Any]) -> None:
    """Let go of a step's gradients, so that ``zero_grad()`` frees them as it would without
    the plan."""
    for b in buckets:
        b.g = TensorList()


def forget(opt: Any) -> None:
    """Drop every plan (state converted in place by ``configure``, or replaced by
    ``load_state_dict``: the plans would keep the old tensors alive)."""
    opt.__dict__.pop(_ATTR, None)
    opt.__dict__.pop(_STATE_ATTR, None)
