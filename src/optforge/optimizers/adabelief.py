"""AdaBelief: Adam that adapts to the belief in the gradient (its deviation from the EMA)."""

from __future__ import annotations

import math
from typing import Any

from ..base import Optimizer, ParamsT
from ..constraints import beta_tuple, boolean, non_negative
from ..registry import register


class AdaBelief(Optimizer):
    r"""AdaBelief (Zhuang et al., 2020, Algorithm 2), as the authors' ``adabelief-pytorch``
    0.2.1 computes it.

    .. math::
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
        s_t &= \beta_2 s_{t-1} + (1 - \beta_2)(g_t - m_t)^2 + \epsilon \\
        \theta_t &= \theta_{t-1} - \frac{\mathrm{lr}}{1 - \beta_1^t}
            \cdot \frac{m_t}{\sqrt{\hat{s}_t} / \sqrt{1 - \beta_2^t} + \epsilon}

    with :math:`\hat{s}` the running max of :math:`s` when ``amsgrad``, else :math:`s`.
    With ``rectify`` (the reference's default) the step is RAdam's: with
    :math:`\rho_t` as in :class:`RAdam`, when :math:`\rho_t \ge 5`,
    :math:`\theta_t = \theta_{t-1} - \mathrm{lr}\, r_t \sqrt{1-\beta_2^t} / (1-\beta_1^t)
    \cdot m_t / (\sqrt{s_t} + \epsilon)`, else SGD with momentum
    (``degenerated_to_sgd``) or no step. As in the reference, the rectified step uses
    :math:`s_t`, not its amsgrad maximum.

    Weight decay: decoupled by default (the reference's ``weight_decouple=True``);
    ``weight_decay_mode="absolute"`` is its ``fixed_decay``, ``"coupled"`` its L2.
    State: ``step``, ``exp_avg``, ``exp_avg_var``, ``max_exp_avg_var`` (amsgrad).
    """

    constraints = dict(betas=beta_tuple(2), eps=non_negative, amsgrad=boolean, rectify=boolean,
                       degenerated_to_sgd=boolean)

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-16, weight_decay: float = 0.0, amsgrad: bool = False,
                 rectify: bool = True, degenerated_to_sgd: bool = True, *,
                 weight_decay_mode: str = "decoupled", maximize: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad, rectify=rectify,
                                      degenerated_to_sgd=degenerated_to_sgd,
                                      weight_decay_mode=weight_decay_mode, maximize=maximize))

    def state_names_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_var") + (("max_exp_avg_var",) if group["amsgrad"] else ())

    def update(self, group: dict[str, Any], p, g, s, t):
        (b1, b2), eps, lr = group["betas"], group["eps"], group["lr"]
        m, v = s["exp_avg"], s["exp_avg_var"]
        m.lerp_(g, 1 - b1)                                          # m_t
        r = g.sub(m)                                                # g_t - m_t
        v.mul_(b2).addcmul_(r, r, value=1 - b2).add_(eps)           # s_t (eps inside, as the paper)
        v_hat = s["max_exp_avg_var"].maximum_(v) if group["amsgrad"] else v
        if not group["rectify"]:
            c = [math.sqrt(1 - b2**k) for k in t]                   # bias corrections folded into
            denom = v_hat.sqrt().add_([eps * ck for ck in c])       # scalars, as in Adam
            p.addcdiv_(m, denom, [-lr * ck / (1 - b1**k) for k, ck in zip(t, c)])
            return
        rho_inf = 2 / (1 - b2) - 1
        rho = [rho_inf - 2 * k * b2**k / (1 - b2**k) for k in t]
        tractable = [x >= 5 for x in rho]
        if any(tractable):
            step = [-lr * math.sqrt((1 - b2**k) * (x - 4) / (rho_inf - 4) * (x - 2) / x * rho_inf
                                    / (rho_inf - 2)) / (1 - b1**k)
                    for x, k, ok in zip(rho, t, tractable) if ok]
            p.select(tractable).addcdiv_(m.select(tractable), v.select(tractable).sqrt().add_(eps), step)
        if group["degenerated_to_sgd"] and not all(tractable):
            early = [not ok for ok in tractable]
            p.select(early).add_(m.select(early).mul([-lr / (1 - b1**k) for k, e in zip(t, early) if e]))

register(AdaBelief, "AdaBelief: Adam on the belief (g - m)^2 (Zhuang et al., 2020)")
