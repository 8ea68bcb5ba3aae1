"""Which path a bucket's step runs, by the group's ``fused`` option.

- ``fused=False``: the eager foreach path (``update`` / ``kernel`` over TensorLists).
- ``fused=True``: the fused path: torch's own fused kernel where the optimizer has one
  (``native_fused``), else one generated kernel over flat buffers (:mod:`optforge.fused`).
- ``fused=None`` (the default): torch's own fused kernel where it computes exactly what the
  eager path computes for this bucket (:func:`native_applies`), else the eager path. Nothing is
  compiled and the parameters' storage is never touched, so this choice costs nothing to take.

torch's fused kernels (SGD, Adam, AdamW, AMSGrad, Adagrad) run the same algorithm in one pass
over memory; they are taken by default only for plain contiguous float32/float64 tensors on CPU
or CUDA (complex ones as their real pairs) whose optimizer class computes the update exactly as
the class that declared ``native_fused`` (a subclass that changes ``kernel``, ``scalars``,
``transform_grads``, ... gets the eager path).
float16/bfloat16 buckets stay eager: torch's kernels compute them in float32, the eager path in
the parameter's dtype, so the two would round differently.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import lowbit

__all__ = ["contiguous", "native_applies", "native_by_default", "place_loaded_step", "runs_native",
           "steps_on_device"]

_DEVICES = frozenset({"cpu", "cuda"})
_DTYPES = frozenset({torch.float32, torch.float64})
_PLAIN = frozenset({torch.Tensor, torch.nn.Parameter})
#: The methods whose results ``fused_update`` replaces: overriding any of them (below the class
#: that declared ``native_fused``) changes the algorithm, so torch's kernel no longer computes it.
_UPDATE_METHODS = ("native_fused", "fused_update", "update", "kernel", "scalars", "transform_grads",
                   "decay_lr", "prepare", "finish", "step_bucket", "init_state")


def _declaring_class(cls: type) -> type:
    return next(klass for klass in cls.__mro__ if "native_fused" in vars(klass))


def _exact_class(cls: type) -> bool:
    """Whether ``cls`` computes its update as the class that declared its ``native_fused``."""
    owner = _declaring_class(cls)
    return all(getattr(cls, name) is getattr(owner, name) for name in _UPDATE_METHODS)


_EXACT: dict[type, bool] = {}


def native_by_default(opt: Any, group: dict[str, Any], key: tuple) -> bool:
    """Whether a ``fused=None`` bucket of ``key`` = (device, dtype[, DTensor mesh]) in ``group``
    gets torch's fused kernel (before looking at its tensors). DTensor buckets (a mesh in the
    key) run eagerly by default; ``fused=True`` runs torch's kernel on their local shards."""
    if group.get("fused") is not None or group.get("state_precision") or len(key) != 2:
        return False
    device, dtype = key
    if dtype.is_complex:          # computed as view_as_real pairs
        dtype = dtype.to_real()
    if device.type not in _DEVICES or dtype not in _DTYPES:
        return False
    cls = type(opt)
    exact = _EXACT.get(cls)
    if exact is None:
        exact = _EXACT[cls] = _exact_class(cls)
    return exact and opt.native_fused(group)


def native_applies(opt: Any, group: dict[str, Any], b: Any) -> bool:
    """Whether a ``fused=None`` bucket ``b`` runs torch's fused kernel this step: plain
    contiguous tensors (DTensor, sparse gradients and other layouts run eagerly), step counts on
    the parameters' device."""
    if b.sparse or b.low_precision or not native_by_default(opt, group, b.key):
        return False
    if not _PLAIN.issuperset(map(type, b.params)) or not contiguous(b):
        return False
    device = b.key[0]
    return device.type == "cpu" or all(s.device == device for s in b.steps)


def runs_native(opt: Any, group: dict[str, Any], b: Any) -> bool:
    """Whether ``Optimizer.step_bucket`` steps bucket ``b`` with torch's fused kernel: ``fused=True``
    where the optimizer has one and the bucket is contiguous, ``fused=None`` by
    :func:`native_applies`; never for low-bit state."""
    if group.get("state_precision") and lowbit.holds(b):
        return False
    if group.get("fused"):
        return not (b.low_precision or b.sparse) and opt.native_fused(group) and contiguous(b)
    return group.get("fused") is None and native_applies(opt, group, b)


def contiguous(b: Any) -> bool:
    """Whether a bucket's params, gradients and state are contiguous: torch's fused kernels walk
    memory as if they were (other layouts, e.g. strided views or channels_last, run eagerly)."""
    return all(all(map(Tensor.is_contiguous, xs)) for xs in (b.p, b.g, *b.s.values()))


def steps_on_device(opt: Any, group: dict[str, Any], key: tuple) -> bool:
    """Whether new step counts of a bucket live on its device in float32 (torch's fused
    convention) rather than on the CPU: where torch's fused kernel on a non-CPU device reads
    them. A generated kernel takes its step-dependent numbers from the host, which would have
    to wait for the device to read counts kept there."""
    if key[0].type == "cpu":
        return bool(group.get("fused"))
    if group.get("fused"):
        return opt.native_fused(group)
    return native_by_default(opt, group, key)


def place_loaded_step(opt: Any, group: dict[str, Any], key: tuple, state: dict[str, Any]) -> None:
    """Put the loaded step count of a parameter of a non-CPU bucket ``key`` where this
    optimizer keeps new ones (:func:`steps_on_device`): torch's ``load_state_dict`` moves the
    counts of every ``fused=True`` group onto the device and leaves the others where they were
    saved, which may be either."""
    step, device = state.get("step"), key[0]
    if not isinstance(step, Tensor) or device.type == "cpu":
        return
    if steps_on_device(opt, group, key):
        if step.device != device:
            state["step"] = step.to(device=device, dtype=torch.float32)
    elif step.device.type != "cpu":
        state["step"] = step.cpu()
