"""Adamax: Adam with an infinity-norm second moment (torch.optim semantics)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..base import Optimizer, ParamsT
from ..constraints import beta_tuple, non_negative
from ..registry import register


class Adamax(Optimizer):
    r"""Adamax (Kingma & Ba, 2015, Algorithm 2), as ``torch.optim.Adamax`` computes it:

    .. math::
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
        u_t &= \max(\beta_2 u_{t-1},\ |g_t| + \epsilon) \\
        \theta_t &= \theta_{t-1} - \frac{\mathrm{lr}}{1 - \beta_1^t} \cdot \frac{m_t}{u_t}

    (:math:`\epsilon` inside the max, as torch places it). Weight decay is coupled L2 by
    default. State: ``step``, ``exp_avg`` (m), ``exp_inf`` (u).

    torch's signature (``foreach``, ``differentiable``, ``capturable``: see
    :mod:`optforge.torch_compat`), and ``fused``, which torch's Adamax has not.
    """

    constraints = dict(betas=beta_tuple(2), eps=non_negative)
    state_names = ("exp_avg", "exp_inf")
    state_kinds = dict(exp_inf="non_negative")

    def __init__(self, params: ParamsT, lr: float | Tensor = 2e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, foreach: bool | None = None, *,
                 maximize: bool = False, differentiable: bool = False, capturable: bool = False,
                 weight_decay_mode: str = "coupled", fused: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      foreach=foreach, maximize=maximize, differentiable=differentiable,
                                      capturable=capturable, weight_decay_mode=weight_decay_mode,
                                      fused=fused))

    def scalars(self, group: dict[str, Any], t: float) -> dict[str, float]:
        return dict(step=-group["lr"] / (1 - group["betas"][0] ** t))

    @staticmethod
    def kernel(group, p, g, s, c):
        b1, b2 = group["betas"]
        m = s["exp_avg"].lerp_(g, 1 - b1)                                   # m_t
        u = s["exp_inf"].mul_(b2).maximum_(g.abs().add_(group["eps"]))     # u_t = max(b2 u, |g| + eps)
        p.addcdiv_(m, u, c["step"])                                         # theta -= lr/(1-b1^t) m/u


register(Adamax, "Adamax: Adam with an infinity-norm second moment (Kingma & Ba, 2015)")
