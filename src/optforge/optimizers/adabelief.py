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
    state_kinds = dict(exp_avg_var="non_negative", max_exp_avg_var="non_negative")

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-16, weight_decay: float = 0.0, amsgrad: bool = False,
                 rectify: bool = True, degenerated_to_sgd: bool = True, *,
                 weight_decay_mode: str = "decoupled", maximize: bool = False, fused: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad, rectify=rectify,
                                      degenerated_to_sgd=degenerated_to_sgd,
                                      weight_decay_mode=weight_decay_mode, maximize=maximize, fused=fused))

    def state_names_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_var") + (("max_exp_avg_var",) if group["amsgrad"] else ())

    def scalars(self, group: dict[str, Any], t: float) -> dict[str, float]:
        (b1, b2), lr = group["betas"], group["lr"]
        c = math.sqrt(1 - b2**t)
        if not group["rectify"]:   # bias corrections folded into scalars, as in Adam
            return dict(eps=group["eps"] * c, step=-lr * c / (1 - b1**t), sgd=0.0)
        rho_inf = 2 / (1 - b2) - 1
        rho = rho_inf - 2 * t * b2**t / (1 - b2**t)
        if rho >= 5:
            r = math.sqrt((1 - b2**t) * (rho - 4) / (rho_inf - 4) * (rho - 2) / rho * rho_inf
                          / (rho_inf - 2))
            return dict(eps=group["eps"], step=-lr * r / (1 - b1**t), sgd=0.0)
        sgd = -lr / (1 - b1**t) if group["degenerated_to_sgd"] else 0.0
        return dict(eps=group["eps"], step=0.0, sgd=sgd)

    @staticmethod
    def kernel(group, p, g, s, c):
        b1, b2 = group["betas"]
        m, v = s["exp_avg"], s["exp_avg_var"]
        m.lerp_(g, 1 - b1)                                          # m_t
        r = g.sub(m)                                                # g_t - m_t
        v.mul_(b2).addcmul_(r, r, value=1 - b2).add_(group["eps"])  # s_t (eps inside, as the paper)
        del r                                                       # its memory serves the next temporary
        if group["amsgrad"]:
            s["max_exp_avg_var"].maximum_(v)
            if not group["rectify"]:   # the reference's rectified step uses s_t, not its max
                v = s["max_exp_avg_var"]
        p.addcdiv_(m, v.sqrt().add_(c["eps"]), c["step"])          # adaptive step
        p.add_(m, alpha=c["sgd"])                                   # rho_t < 5: SGD with momentum


register(AdaBelief, "AdaBelief: Adam on the belief (g - m)^2 (Zhuang et al., 2020)")
