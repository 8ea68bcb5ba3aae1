"""Weight decay policies, applied by the base class before an optimizer's update.

``weight_decay_mode`` selects, per optimizer default and per param group:

- ``"coupled"``   (L2, Adam/SGD style):      g <- g + wd * p      (a new gradient list; p.grad is untouched)
- ``"decoupled"`` (AdamW, Loshchilov & Hutter): p <- p * (1 - lr * wd)
- ``"absolute"``  (fixed decay, AdaBelief's ``fixed_decay``): p <- p * (1 - wd)

For ``"decoupled"`` the lr is the optimizer's ``decay_lr`` (the group lr unless the algorithm
says otherwise, e.g. Compass decays with its bias-corrected step size).
"""

from __future__ import annotations

from collections.abc import Sequence

from .tensorlist import TensorList

WEIGHT_DECAY_MODES = ("coupled", "decoupled", "absolute")

__all__ = ["WEIGHT_DECAY_MODES", "apply_weight_decay"]


def apply_weight_decay(
    mode: str,
    weight_decay: float,
    params: TensorList,
    grads: TensorList,
    decay_lr: float | Sequence[float],
    grads_owned: bool,
) -> TensorList:
    """Apply the policy; returns the gradients the update should use.

    ``grads_owned`` says whether ``grads`` is already a private copy that may be changed in place.
    """
    if weight_decay == 0:
        return grads
    if mode == "coupled":
        if grads_owned:
            return grads.add_(params, alpha=weight_decay)
        return grads.add(params, alpha=weight_decay)
    if mode == "decoupled":
        # an optimizer that applies its own decoupled decay (LAMB, Prodigy) passes decay_lr 0
        if isinstance(decay_lr, Sequence):
            if any(decay_lr):
                params.mul_([1 - lr * weight_decay for lr in decay_lr])
        elif decay_lr != 0:
            params.mul_(1 - decay_lr * weight_decay)
    elif mode == "absolute":
        params.mul_(1 - weight_decay)
    else:
        raise ValueError(f"invalid weight_decay_mode={mode!r}: expected one of {WEIGHT_DECAY_MODES}")
    return grads
