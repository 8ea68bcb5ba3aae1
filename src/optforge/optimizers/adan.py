"""Adan: adaptive Nesterov momentum with moments of gradient differences."""

from __future__ import annotations

import math
from typing import Any

from ..base import Optimizer, ParamsT
from ..constraints import beta_tuple, boolean, non_negative
from ..registry import register


class Adan(Optimizer):
    r"""Adan (Xie et al., "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing
    Deep Models", TPAMI 2024, arXiv:2208.06677, Algorithm 1), as the authors' code
    (sail-sg/Adan, also ``timm.optim.Adan``) computes it.

    ``betas=(b1, b2, b3)`` are the decay rates of the moments, as in the official code: the
    paper's :math:`\beta_i` is ``1 - b_i`` (paper defaults 0.02, 0.08, 0.01).
    With :math:`g_0 = g_1` (no difference on the first step):

    .. math::
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
        v_t &= \beta_2 v_{t-1} + (1 - \beta_2)(g_t - g_{t-1}) \\
        n_t &= \beta_3 n_{t-1} + (1 - \beta_3)\left(g_t + \beta_2 (g_t - g_{t-1})\right)^2 \\
        u_t &= \left(\frac{m_t}{1 - \beta_1^t} + \beta_2 \frac{v_t}{1 - \beta_2^t}\right)
               \Big/ \left(\sqrt{n_t / (1 - \beta_3^t)} + \epsilon\right) \\
        \theta_t &= \frac{\theta_{t-1} - \mathrm{lr}\, u_t}{1 + \mathrm{lr}\,\lambda}
            \quad \text{(proximal decay, default)}, \qquad
        \theta_t = \theta_{t-1}(1 - \mathrm{lr}\,\lambda) - \mathrm{lr}\, u_t
            \quad \text{(``no_prox=True``)}

    The proximal form is decoupled decay by :math:`1/(1 + \mathrm{lr}\lambda)` followed by the
    step scaled by the same factor (``decay_lr`` and ``scalars``). ``weight_decay_mode="coupled"``
    (L2 in the gradient, not in the reference) ignores ``no_prox``.
    State: ``step``, ``exp_avg`` (m), ``exp_avg_diff`` (v), ``exp_avg_sq`` (n), ``pre_grad``.
    """

    constraints = dict(betas=beta_tuple(3), eps=non_negative, no_prox=boolean)
    state_names = ("exp_avg", "exp_avg_diff", "exp_avg_sq", "pre_grad")
    state_kinds = dict(exp_avg_sq="non_negative")

    def __init__(self, params: ParamsT, lr: float = 1e-3,
                 betas: tuple[float, float, float] = (0.98, 0.92, 0.99), eps: float = 1e-8,
                 weight_decay: float = 0.0, no_prox: bool = False, *,
                 weight_decay_mode: str = "decoupled", maximize: bool = False, fused: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      no_prox=no_prox, weight_decay_mode=weight_decay_mode,
                                      maximize=maximize, fused=fused))

    def _prox(self, group: dict[str, Any]) -> bool:
        return not group["no_prox"] and group["weight_decay_mode"] == "decoupled"

    def decay_lr(self, group: dict[str, Any], t: list[float]) -> Any:
        # proximal: p * (1 - lr' wd) = p / (1 + lr wd) with lr' = lr / (1 + lr wd)
        lr = group["lr"]
        return lr / (1 + lr * group["weight_decay"]) if self._prox(group) else lr

    def scalars(self, group: dict[str, Any], t: float) -> dict[str, float]:
        (b1, b2, b3), lr = group["betas"], group["lr"]
        scale = 1 / (1 + lr * group["weight_decay"]) if self._prox(group) else 1.0
        c = math.sqrt(1 - b3**t)          # sqrt(1 - b3^t) folded into eps and the step sizes
        first = 0.0 if t == 1 else 1.0   # g_0 = g_1: no gradient difference on step 1
        return dict(eps=group["eps"] * c, m=-lr * scale * c / (1 - b1**t),
                    v=-lr * scale * b2 * c / (1 - b2**t), vd=(1 - b2) * first, nd=b2 * first)

    @staticmethod
    def kernel(group, p, g, s, c):
        b1, _, b3 = group["betas"]
        m, v, n, pre = s["exp_avg"], s["exp_avg_diff"], s["exp_avg_sq"], s["pre_grad"]
        d = g.sub(pre)                                   # g_t - g_{t-1}
        m.lerp_(g, 1 - b1)                               # m_t = b1 m + (1 - b1) g_t
        v.lerp_(d, c["vd"])                              # v_t = b2 v + (1 - b2)(g_t - g_{t-1})
        u = d.mul_(c["nd"]).add_(g)                      # g_t + b2 (g_t - g_{t-1})
        n.mul_(b3).addcmul_(u, u, value=1 - b3)          # n_t = b3 n + (1 - b3) u^2
        del d, u                                         # their memory serves the next temporary
        den = n.sqrt().add_(c["eps"])                    # sqrt(n_t / (1 - b3^t)) + eps, times c
        p.addcdiv_(m, den, c["m"])                       # theta -= lr m_t / (1 - b1^t) / den
        p.addcdiv_(v, den, c["v"])                       # theta -= lr b2 v_t / (1 - b2^t) / den
        pre.copy_(g)                                     # g_{t-1} <- g_t


register(Adan, "Adan: adaptive Nesterov momentum from gradient differences (Xie et al., 2022)")
