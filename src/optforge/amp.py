"""``torch.amp.GradScaler``'s fast path for optimizers built with ``fused=True``.

For an optimizer whose ``_step_supports_amp_scaling`` is true, ``GradScaler.step`` does not
unscale the gradients and read the inf flag on the host (which on a GPU waits for the device);
it sets ``opt.grad_scale`` (None if the user already called ``unscale_``) and ``opt.found_inf``
and calls ``opt.step()``. torch's fused kernels (SGD, Adam, AdamW, AMSGrad, Adagrad) take both:
they divide the gradients by the scale and skip the update on the device where an inf was found.
As torch's optimizers built with ``fused=True`` do, optforge's do the same with those kernels,
wherever every bucket of the step runs one (:func:`optforge.paths.runs_native`); where one does
not (a non-contiguous or sparse tensor, another dtype, an option torch's kernel lacks), the step
first does what ``GradScaler`` does for any other optimizer: it unscales the gradients and skips
the whole step on an inf.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import Tensor

from . import paths

__all__ = ["SKIP", "handed", "resolve", "standard_path", "supports_scaling", "to_device"]

#: :func:`resolve`'s answer for a step that found an inf on the standard path: nothing to do.
SKIP = object()


def supports_scaling(opt: Any) -> bool:
    """Whether ``opt`` takes the scaler's fast path: as torch's optimizers, where it was built
    with ``fused=True`` and has torch's fused kernels (and a ``fused_update`` that takes
    ``grad_scale`` and ``found_inf``, and nothing of its own around the buckets' steps). Not by
    default: some trainers then refuse to clip gradients (Lightning: "does not allow for
    gradient clipping because it performs unscaling of gradients internally")."""
    return opt.defaults.get("fused") is True and _has_fused_kernels(type(opt))


@functools.cache
def _has_fused_kernels(cls: type) -> bool:
    from .base import Optimizer

    return (cls.native_fused is not Optimizer.native_fused and cls.step_group is Optimizer.step_group
            and cls.step_bucket is Optimizer.step_bucket
            and "found_inf" in inspect.signature(cls.fused_update).parameters)


def handed(opt: Any) -> tuple[Tensor | None, Tensor] | None:
    """``(grad_scale, found_inf)`` that ``GradScaler.step`` set on ``opt`` for this step, or None."""
    found_inf = getattr(opt, "found_inf", None)
    return None if found_inf is None else (getattr(opt, "grad_scale", None), found_inf)


def resolve(opt: Any, ready: list[tuple[dict[str, Any], list[Any]]], scaling: tuple[Tensor | None, Tensor],
            had_state: int) -> tuple[Tensor | None, Tensor] | object | None:
    """For a step with ``scaling`` handed and its buckets ``ready``: the scaling itself where
    every bucket runs torch's fused kernel; else, after the standard path unscaled the
    gradients, None, or :data:`SKIP` on an inf. If the standard path refuses the gradients, the
    state this step created (the entries after the first ``had_state``) is dropped: nothing
    half-done."""
    if all(paths.runs_native(opt, group, b) for group, buckets in ready for b in buckets):
        return scaling
    try:
        found_inf = standard_path(opt, *scaling)
    except ValueError:
        for p in list(opt.state)[had_state:]:
            del opt.state[p]
        raise
    return SKIP if found_inf else None


def to_device(scaling: tuple[Tensor | None, Tensor], device: torch.device) -> tuple[Tensor | None, Tensor]:
    """The scale and the flag on ``device``, as torch's fused optimizers copy them there."""
    scale, found_inf = scaling
    return (None if scale is None else scale.to(device, non_blocking=True),
            found_inf.to(device, non_blocking=True))


def standard_path(opt: Any, grad_scale: Tensor | None, found_inf: Tensor) -> bool:
    """What ``GradScaler`` does for an optimizer without the fast path: unscale every gradient
    (unless the user did: ``grad_scale`` None) with the same kernel and reciprocal, then read the
    flag. True: an inf was found, so the step is skipped."""
    if grad_scale is not None:
        inv_scale = grad_scale.double().reciprocal().float()
        by_device: dict[tuple, list[Tensor]] = {}
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.dtype == torch.float16:
                    raise ValueError("Attempting to unscale FP16 gradients.")
                g = p.grad._values() if p.grad.is_sparse else p.grad
                by_device.setdefault((g.device, g.dtype), []).append(g)
        for (device, _), grads in by_device.items():
            unused = torch.zeros((), dtype=torch.float32, device=device)   # found_inf is known
            torch._amp_foreach_non_finite_check_and_unscale_(grads, unused, inv_scale.to(device))
    return bool(found_inf.item())
