"""Adam, AdamW and AMSGrad (torch.optim semantics)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..base import Optimizer, ParamsT
from ..constraints import beta_tuple, boolean, non_negative
from ..registry import register
from ..torch_compat import DECOUPLED_WEIGHT_DECAY


class Adam(Optimizer):
    r"""Adam (Kingma & Ba, 2015, Algorithm 1), as ``torch.optim.Adam`` computes it.

    With :math:`\hat{v}` the running max of :math:`v` when ``amsgrad`` (Reddi et al., 2018),
    else :math:`v`:

    .. math::
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
        v_t &= \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
        \theta_t &= \theta_{t-1} - \frac{\mathrm{lr}_t}{1 - \beta_1^t}
                   \cdot \frac{m_t}{\sqrt{\hat{v}_t} / \sqrt{1 - \beta_2^t} + \epsilon}

    ``lr_t`` is the group lr (:class:`AdamWarmup` and :class:`Noam` schedule it per step).
    Weight decay is coupled L2 by default; ``decoupled_weight_decay=True`` (torch's name) or
    ``weight_decay_mode="decoupled"`` is AdamW. State: ``step``, ``exp_avg`` (m),
    ``exp_avg_sq`` (v), ``max_exp_avg_sq`` (amsgrad).

    torch's signature (``foreach``, ``capturable``, ``differentiable``, ``fused``: see
    :mod:`optforge.torch_compat`); ``betas`` are Python numbers (torch also takes tensors, for
    capturable steps, which optforge does not have). By default (``fused=None``) float32/float64
    steps run torch's fused Adam/AdamW kernel, the same update in one pass over memory, unless
    ``weight_decay_mode="absolute"`` (:mod:`optforge.paths`); ``fused=False`` forces the
    foreach path.
    """

    constraints = dict(betas=beta_tuple(2), eps=non_negative, amsgrad=boolean, **DECOUPLED_WEIGHT_DECAY)
    state_kinds = dict(exp_avg_sq="non_negative", max_exp_avg_sq="non_negative")

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *,
                 foreach: bool | None = None, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None,
                 decoupled_weight_decay: bool = False, weight_decay_mode: str | None = None) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad, foreach=foreach, maximize=maximize,
                                      capturable=capturable, differentiable=differentiable, fused=fused,
                                      decoupled_weight_decay=decoupled_weight_decay,
                                      weight_decay_mode=weight_decay_mode))

    def state_names_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())

    def lr_at(self, group: dict[str, Any], t: float) -> float:
        """The lr of step ``t`` (constant here)."""
        return group["lr"]

    def scalars(self, group: dict[str, Any], t: float) -> dict[str, float]:
        # Bias corrections folded into scalars (one pass fewer than dividing v by them):
        # lr_t/(1-b1^t) * m/(sqrt(v)/c + eps) = lr_t c/(1-b1^t) * m/(sqrt(v) + eps c), c = sqrt(1-b2^t)
        b1, b2 = group["betas"]
        c = math.sqrt(1 - b2**t)
        return dict(eps=group["eps"] * c, step=-self.lr_at(group, t) * c / (1 - b1**t))

    @staticmethod
    def kernel(group, p, g, s, c):
        b1, b2 = group["betas"]
        m, v = s["exp_avg"], s["exp_avg_sq"]
        m.lerp_(g, 1 - b1)                                   # m_t = b1 m + (1 - b1) g
        v.mul_(b2).addcmul_(g, g, value=1 - b2)              # v_t = b2 v + (1 - b2) g^2
        if group["amsgrad"]:
            v = s["max_exp_avg_sq"].maximum_(v)              # v_hat = max(v_hat, v_t)
        p.addcdiv_(m, v.sqrt().add_(c["eps"]), c["step"])    # theta -= step m / (sqrt(v_hat) + eps c)

    def native_fused(self, group: dict[str, Any]) -> bool:
        # torch's fused kernels compute exactly this algorithm at a constant lr
        return type(self).lr_at is Adam.lr_at and group["weight_decay_mode"] != "absolute"

    def fused_update(self, group, p, g, s, steps, grad_scale=None, found_inf=None):
        kernel = torch._fused_adamw_ if group["weight_decay_mode"] == "decoupled" else torch._fused_adam_
        b1, b2 = group["betas"]
        kernel(p, g, s["exp_avg"], s["exp_avg_sq"], s.get("max_exp_avg_sq", []), steps,
               amsgrad=group["amsgrad"], lr=group["lr"], beta1=b1, beta2=b2,
               weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
               grad_scale=grad_scale, found_inf=found_inf)


class AdamW(Adam):
    r"""AdamW (Loshchilov & Hutter, 2019): Adam with decoupled weight decay,
    :math:`\theta \leftarrow \theta (1 - \mathrm{lr} \cdot \lambda)` before the Adam step,
    as ``torch.optim.AdamW`` computes it (and its signature). Same state as :class:`Adam`."""

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, foreach: bool | None = None, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None,
                 weight_decay_mode: str | None = "decoupled") -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=weight_decay_mode in (None, "decoupled"),
                         weight_decay_mode=weight_decay_mode)


class AMSGrad(Adam):
    """AMSGrad (Reddi et al., 2018): :class:`Adam` with ``amsgrad=True``, a running maximum of
    the second moment so the effective step size never grows (``torch.optim.Adam(amsgrad=True)``,
    whose signature it takes)."""

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = True, *,
                 foreach: bool | None = None, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None,
                 decoupled_weight_decay: bool = False, weight_decay_mode: str | None = None) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=decoupled_weight_decay, weight_decay_mode=weight_decay_mode)

register(Adam, "Adam (Kingma & Ba, 2015); L2 weight decay; amsgrad option")
register(AdamW, "AdamW: Adam with decoupled weight decay (Loshchilov & Hutter, 2019)")
register(AMSGrad, "AMSGrad: Adam with a running max of the second moment (Reddi et al., 2018)")
