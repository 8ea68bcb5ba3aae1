"""RMSprop (torch.optim semantics)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..base import Optimizer, ParamsT
from ..constraints import boolean, non_negative, unit_interval
from ..registry import register


class RMSprop(Optimizer):
    r"""RMSprop (Hinton, 2012, lecture 6e), centered as in Graves (2013), as
    ``torch.optim.RMSprop`` computes it:

    .. math::
        v_t &= \alpha v_{t-1} + (1 - \alpha) g_t^2 \\
        \bar g_t &= \alpha \bar g_{t-1} + (1 - \alpha) g_t, \qquad
        d_t = \sqrt{v_t - \bar g_t^2} + \epsilon \ \text{(centered)} \quad\text{else}\quad
        d_t = \sqrt{v_t} + \epsilon \\
        b_t &= \mu\, b_{t-1} + g_t / d_t, \qquad \theta_t = \theta_{t-1} - \mathrm{lr}\, b_t
        \quad \text{(momentum } \mu > 0\text{)} \quad\text{else}\quad
        \theta_t = \theta_{t-1} - \mathrm{lr}\, g_t / d_t

    Weight decay is coupled L2 by default. State: ``step``, ``square_avg`` (v),
    ``momentum_buffer`` (b, momentum > 0), ``grad_avg`` (:math:`\bar g`, centered).

    ``alpha`` must lie in [0, 1), where torch takes any alpha >= 0: at 1 the average never
    sees a gradient (with ``eps=0`` the step divides by zero), above 1 it weighs
    :math:`g^2` negatively and its square root turns NaN. Centered, as in torch, the variance
    :math:`v_t - \bar g_t^2` of a gradient that stops changing goes to 0, and rounding can make
    it negative: its square root is then NaN (with ``alpha=0`` at once).

    torch's signature (``foreach``, ``capturable``, ``differentiable``: see
    :mod:`optforge.torch_compat`), and ``fused``, which torch's RMSprop has not.
    """

    constraints = dict(alpha=unit_interval, eps=non_negative, momentum=non_negative, centered=boolean)

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False,
                 capturable: bool = False, foreach: bool | None = None, maximize: bool = False,
                 differentiable: bool = False, *, weight_decay_mode: str = "coupled",
                 fused: bool = False) -> None:
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                                      momentum=momentum, centered=centered, capturable=capturable,
                                      foreach=foreach, maximize=maximize, differentiable=differentiable,
                                      weight_decay_mode=weight_decay_mode, fused=fused))

    state_kinds = dict(square_avg="non_negative")

    def state_names_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        return (("square_avg",) + (("momentum_buffer",) if group["momentum"] > 0 else ())
                + (("grad_avg",) if group["centered"] else ()))

    def scalars(self, group: dict[str, Any], t: float) -> dict[str, float]:
        return dict(step=-group["lr"])

    @staticmethod
    def kernel(group, p, g, s, c):
        alpha, mu = group["alpha"], group["momentum"]
        v = s["square_avg"].mul_(alpha).addcmul_(g, g, value=1 - alpha)   # v_t
        if group["centered"]:
            avg = s["grad_avg"].lerp_(g, 1 - alpha)                         # g_bar_t
            d = v.addcmul(avg, avg, value=-1).sqrt_()                       # sqrt(v_t - g_bar_t^2)
        else:
            d = v.sqrt()
        d.add_(group["eps"])
        if mu > 0:
            b = s["momentum_buffer"].mul_(mu).addcdiv_(g, d)                # b_t = mu b + g / d
            p.add_(b, alpha=c["step"])                                      # theta -= lr b_t
        else:
            p.addcdiv_(g, d, c["step"])                                     # theta -= lr g / d


register(RMSprop, "RMSprop (Hinton, 2012); centered (Graves, 2013) and momentum options")
