"""Adam with an lr schedule inside the optimizer: AdamWarmup and Noam (labml's annotated
implementations)."""

from __future__ import annotations

from typing import Any

from ..base import Optimizer, ParamsT
from ..constraints import integer_at_least, positive
from ..registry import register
from ..torch_compat import DECOUPLED_WEIGHT_DECAY
from .adam import Adam

# Adam's own hyperparameters, without torch's decoupled_weight_decay (these have no torch twin)
ADAM_CONSTRAINTS = {k: v for k, v in Adam.constraints.items() if k not in DECOUPLED_WEIGHT_DECAY}


class AdamWarmup(Adam):
    r""":class:`Adam` whose lr rises linearly over the first ``warmup`` steps:

    .. math::
        \mathrm{lr}_t = \begin{cases} 10^{-8} + t\,\mathrm{lr} / w & t < w \\
                                      \mathrm{lr} & t \ge w \end{cases}

    exactly as the annotated (labml) implementation defines it, including its :math:`10^{-8}`
    floor. Defaults follow it too: ``eps=1e-16`` and decoupled weight decay (scaled by the
    group lr, not the warmed-up one). Prefer :func:`optforge.schedules` warmups for new code;
    this class exists so that training code written with labml's AdamWarmup keeps its exact
    numbers.
    """

    constraints = {**ADAM_CONSTRAINTS, "warmup": integer_at_least(0)}

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-16, weight_decay: float = 0.0, amsgrad: bool = False,
                 warmup: int = 0, *, weight_decay_mode: str = "decoupled",
                 maximize: bool = False, fused: bool = False) -> None:
        Optimizer.__init__(self, params, dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, warmup=warmup,
            weight_decay_mode=weight_decay_mode, maximize=maximize, fused=fused))

    def lr_at(self, group: dict[str, Any], t: float) -> float:
        w = group["warmup"]
        return 1e-8 + t * group["lr"] / w if w > t else group["lr"]


class Noam(Adam):
    r""":class:`Adam` with the Transformer's lr schedule (Vaswani et al., 2017, eq. 3):

    .. math::
        \mathrm{lr}_t = \mathrm{lr}\cdot d_{model}^{-1/2}\cdot\min\left(t^{-1/2},\ t\,w^{-3/2}\right)

    ``lr`` is a dimensionless scale (1.0 as in the paper); the peak lr, reached at
    :math:`t = w`, is :math:`\mathrm{lr}/\sqrt{d_{model} w}`. Other defaults follow the
    annotated (labml) implementation: ``eps=1e-16``, decoupled weight decay.
    """

    constraints = {**ADAM_CONSTRAINTS, "warmup": integer_at_least(1), "d_model": positive}

    def __init__(self, params: ParamsT, lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-16, weight_decay: float = 0.0, amsgrad: bool = False,
                 warmup: int = 4000, d_model: int = 512, *, weight_decay_mode: str = "decoupled",
                 maximize: bool = False, fused: bool = False) -> None:
        Optimizer.__init__(self, params, dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, warmup=warmup,
            d_model=d_model, weight_decay_mode=weight_decay_mode, maximize=maximize, fused=fused))

    def lr_at(self, group: dict[str, Any], t: float) -> float:
        return group["lr"] * group["d_model"] ** -0.5 * min(t**-0.5, t * group["warmup"] ** -1.5)

register(AdamWarmup, "Adam with linear lr warmup inside the optimizer (labml)", name="adam_warmup",
         aliases=("adamwarmup",))
# compare_lr: the default scale 1.0 (d_model 512, warmup 4000) gives lr = 1.7e-7 t, too small for
# the few thousand steps of a comparison; 5.0 reaches 1e-3 by step 1,150.
register(Noam, "Adam with the Transformer (Noam) lr schedule inside the optimizer", compare_lr=5.0)
