"""RAdam: Adam with a rectified adaptive learning rate."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from ..base import Optimizer, ParamsT
from ..constraints import beta_tuple, boolean, non_negative
from ..registry import register
from ..torch_compat import DECOUPLED_WEIGHT_DECAY


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

    torch's signature (``decoupled_weight_decay=True`` is ``weight_decay_mode="decoupled"``;
    ``foreach``, ``capturable``, ``differentiable``: see :mod:`optforge.torch_compat`), and
    ``fused``, which torch's RAdam has not.
    """

    constraints = dict(betas=beta_tuple(2), eps=non_negative, degenerated_to_sgd=boolean,
                       **DECOUPLED_WEIGHT_DECAY)
    state_names = ("exp_avg", "exp_avg_sq")
    state_kinds = dict(exp_avg_sq="non_negative")

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, decoupled_weight_decay: bool = False, *,
                 foreach: bool | None = None, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False, degenerated_to_sgd: bool = True,
                 weight_decay_mode: str | None = None, fused: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      decoupled_weight_decay=decoupled_weight_decay, foreach=foreach,
                                      maximize=maximize, capturable=capturable, differentiable=differentiable,
                                      degenerated_to_sgd=degenerated_to_sgd,
                                      weight_decay_mode=weight_decay_mode, fused=fused))

    def scalars(self, group: dict[str, Any], t: float) -> dict[str, float]:
        (b1, b2), lr = group["betas"], group["lr"]
        rho_inf = 2 / (1 - b2) - 1
        rho = rho_inf - 2 * t * b2**t / (1 - b2**t)
        if rho > 5:   # tractable: the rectified adaptive step, with sqrt(1 - b2^t) folded in
            r = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
            return dict(adaptive=-lr * r * math.sqrt(1 - b2**t) / (1 - b1**t), sgd=0.0)
        return dict(adaptive=0.0, sgd=-lr / (1 - b1**t) if group["degenerated_to_sgd"] else 0.0)

    @staticmethod
    def kernel(group, p, g, s, c):
        b1, b2 = group["betas"]
        m, v = s["exp_avg"], s["exp_avg_sq"]
        m.lerp_(g, 1 - b1)                                   # m_t
        v.mul_(b2).addcmul_(g, g, value=1 - b2)              # v_t
        p.addcdiv_(m, v.sqrt().add_(group["eps"]), c["adaptive"])  # rho_t > 5: rectified Adam step
        p.add_(m, alpha=c["sgd"])                            # else: theta -= lr m_t / (1 - b1^t)


register(RAdam, "RAdam: Adam with a rectified adaptive lr (Liu et al., 2020)")
