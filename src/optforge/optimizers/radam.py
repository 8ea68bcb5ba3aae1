"""RAdam: Adam with a rectified adaptive learning rate."""

from __future__ import annotations

import math
from typing import Any

from ..base import Optimizer, ParamsT
from ..constraints import beta_tuple, boolean, non_negative
from ..registry import register


class RAdam(Optimizer):
    r"""RAdam (Liu et al., 2020, Algorithm 2), as ``torch.optim.RAdam`` computes it.

    .. math::
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
        \rho_\infty &= \frac{2}{1 - \beta_2} - 1, \qquad
        \rho_t = \rho_\infty - \frac{2 t \beta_2^t}{1 - \beta_2^t} \\
        r_t &= \sqrt{\frac{(\rho_t - 4)(\rho_t - 2)\rho_\infty}{(\rho_\infty - 4)(\rho_\infty - 2)\rho_t}} \\
        \theta_t &= \theta_{t-1} - \frac{\mathrm{lr}\, r_t}{1 - \beta_1^t}
            \cdot \frac{m_t \sqrt{1 - \beta_2^t}}{\sqrt{v_t} + \epsilon} \quad \text{if } \rho_t > 5

    While the variance is intractable (:math:`\rho_t \le 5`, the first steps) the update is
    SGD with momentum, :math:`\theta_t = \theta_{t-1} - \mathrm{lr}\, m_t / (1 - \beta_1^t)`,
    as torch and the paper's reference do; ``degenerated_to_sgd=False`` skips those steps
    instead (the reference's other option). State: ``step``, ``exp_avg``, ``exp_avg_sq``.
    """

    constraints = dict(betas=beta_tuple(2), eps=non_negative, degenerated_to_sgd=boolean)
    state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, degenerated_to_sgd: bool = True, *,
                 weight_decay_mode: str = "coupled", maximize: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      degenerated_to_sgd=degenerated_to_sgd,
                                      weight_decay_mode=weight_decay_mode, maximize=maximize))

    def update(self, group: dict[str, Any], p, g, s, t):
        (b1, b2), eps, lr = group["betas"], group["eps"], group["lr"]
        m, v = s["exp_avg"], s["exp_avg_sq"]
        m.lerp_(g, 1 - b1)                                   # m_t
        v.mul_(b2).addcmul_(g, g, value=1 - b2)              # v_t
        rho_inf = 2 / (1 - b2) - 1
        rho = [rho_inf - 2 * k * b2**k / (1 - b2**k) for k in t]
        tractable = [r > 5 for r in rho]
        if any(tractable):
            step = [-lr * math.sqrt((r - 4) * (r - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * r))
                    * math.sqrt(1 - b2**k) / (1 - b1**k)
                    for r, k, ok in zip(rho, t, tractable) if ok]
            v_t = v.select(tractable)
            p.select(tractable).addcdiv_(m.select(tractable), v_t.sqrt().add_(eps), step)
        if group["degenerated_to_sgd"] and not all(tractable):
            early = [not ok for ok in tractable]                # theta -= lr m_t / (1 - b1^t)
            p.select(early).add_(m.select(early).mul([-lr / (1 - b1**k) for k, e in zip(t, early) if e]))

register(RAdam, "RAdam: Adam with a rectified adaptive lr (Liu et al., 2020)")
