"""``torch.amp.GradScaler``'s fast path for optimizers with torch's fused kernels.

For an optimizer whose ``_step_supports_amp_scaling`` is true, ``GradScaler.step`` does not
unscale the gradients and read the inf flag on the host (which on a GPU waits for the device);
it sets ``opt.grad_scale`` (None if the user already called ``unscale_``) and ``opt.found_inf``
and calls ``opt.step()``. torch's fused kernels (SGD, Adam, AdamW, AMSGrad, Adagrad) take both:
they divide the gradients by the scale and skip the update on the device where an inf was found.
optforge's classes with those kernels take the same path wherever every bucket of the step runs
one (:func:`optforge.paths.runs_native`); where one does not (a non-contiguous or sparse tensor,
another dtype, an option torch's kernel lacks), the step does what ``GradScaler`` does for any
other optimizer first: it unscales the gradients and skips the whole step on an inf.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import Tensor

__all__ = ["handed", "standard_path", "supports_scaling", "to_device"]


@functools.cache
def supports_scaling(cls: type) -> bool:
    """Whether ``cls`` steps with torch's fused kernels where they apply, its ``fused_update``
    takes ``grad_scale`` and ``found_inf``, and nothing of its own runs around the buckets' steps."""
    from .base import Optimizer

    return (cls.native_fused is not Optimizer.native_fused and cls.step_group is Optimizer.step_group
            and cls.step_bucket is Optimizer.step_bucket
            and "found_inf" in inspect.signature(cls.fused_update).parameters)


def handed(opt: Any) -> tuple[Tensor | None, Tensor] | None:
    """``(grad_scale, found_inf)`` that ``GradScaler.step`` set on ``opt`` for this step, or None."""
    found_inf = getattr(opt, "found_inf", None)
    return None if found_inf is None else (getattr(opt, "grad_scale", None), found_inf)


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
