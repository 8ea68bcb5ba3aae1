"""Adam, AdamW and AMSGrad (torch.optim semantics)."""

from __future__ import annotations

from typing import Any

from ..base import Optimizer, ParamsT
from ..constraints import beta_tuple, boolean, non_negative
from ..registry import register


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
    Weight decay is coupled L2 by default (``weight_decay_mode="decoupled"`` is AdamW).
    State: ``step``, ``exp_avg`` (m), ``exp_avg_sq`` (v), ``max_exp_avg_sq`` (amsgrad).
    """

    constraints = dict(betas=beta_tuple(2), eps=non_negative, amsgrad=boolean)

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *,
                 weight_decay_mode: str = "coupled", maximize: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad, weight_decay_mode=weight_decay_mode,
                                      maximize=maximize))

    def state_names_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())

    def lr_at(self, group: dict[str, Any], t: float) -> float:
        """The lr of step ``t`` (constant here)."""
        return group["lr"]

    def update(self, group, p, g, s, t):
        (b1, b2), eps = group["betas"], group["eps"]
        m, v = s["exp_avg"], s["exp_avg_sq"]
        m.lerp_(g, 1 - b1)                                   # m_t = b1 m + (1 - b1) g
        v.mul_(b2).addcmul_(g, g, value=1 - b2)              # v_t = b2 v + (1 - b2) g^2
        if group["amsgrad"]:
            v = s["max_exp_avg_sq"].maximum_(v)              # v_hat = max(v_hat, v_t)
        # Bias corrections folded into scalars (one pass fewer than dividing v):
        # lr_t/(1-b1^t) * m/(sqrt(v)/c + eps) = lr_t c/(1-b1^t) * m/(sqrt(v) + eps c), c = sqrt(1-b2^t)
        c = [(1 - b2**k) ** 0.5 for k in t]
        denom = v.sqrt().add_([eps * ck for ck in c])
        p.addcdiv_(m, denom, [-self.lr_at(group, k) * ck / (1 - b1**k) for k, ck in zip(t, c)])


class AdamW(Adam):
    r"""AdamW (Loshchilov & Hutter, 2019): Adam with decoupled weight decay,
    :math:`\theta \leftarrow \theta (1 - \mathrm{lr} \cdot \lambda)` before the Adam step,
    as ``torch.optim.AdamW`` computes it. Same state as :class:`Adam`."""

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 weight_decay_mode: str = "decoupled", maximize: bool = False) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad,
                         weight_decay_mode=weight_decay_mode, maximize=maximize)


class AMSGrad(Adam):
    """AMSGrad (Reddi et al., 2018): :class:`Adam` with ``amsgrad=True``, a running maximum of
    the second moment so the effective step size never grows."""

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = True, *,
                 weight_decay_mode: str = "coupled", maximize: bool = False) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad,
                         weight_decay_mode=weight_decay_mode, maximize=maximize)

register(Adam, "Adam (Kingma & Ba, 2015); L2 weight decay; amsgrad option")
register(AdamW, "AdamW: Adam with decoupled weight decay (Loshchilov & Hutter, 2019)")
register(AMSGrad, "AMSGrad: Adam with a running max of the second moment (Reddi et al., 2018)")
