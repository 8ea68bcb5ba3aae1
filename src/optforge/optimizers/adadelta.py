"""Adadelta (torch.optim semantics)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..base import Optimizer, ParamsT
from ..constraints import non_negative, unit_interval
from ..registry import register


class Adadelta(Optimizer):
    r"""Adadelta (Zeiler, 2012), as ``torch.optim.Adadelta`` computes it:

    .. math::
        v_t &= \rho\, v_{t-1} + (1 - \rho)\, g_t^2 \\
        \Delta_t &= \frac{\sqrt{u_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}}\, g_t \\
        u_t &= \rho\, u_{t-1} + (1 - \rho)\, \Delta_t^2 \\
        \theta_t &= \theta_{t-1} - \mathrm{lr}\, \Delta_t

    :math:`\Delta_t` is computed with one square root, of the quotient (torch takes two and
    divides them: the same up to rounding, one pass fewer). Weight decay is coupled L2 by
    default. State: ``step``, ``square_avg`` (v), ``acc_delta`` (u). ``rho`` must lie in
    [0, 1); torch also takes ``rho=1``, where both averages stay zero and the update is plain SGD.

    torch's signature (``foreach``, ``capturable``, ``differentiable``: see
    :mod:`optforge.torch_compat`), and ``fused``, which torch's Adadelta has not.
    """

    constraints = dict(rho=unit_interval, eps=non_negative)
    state_names = ("square_avg", "acc_delta")
    state_kinds = dict(square_avg="non_negative", acc_delta="non_negative")

    def __init__(self, params: ParamsT, lr: float | Tensor = 1.0, rho: float = 0.9, eps: float = 1e-6,
                 weight_decay: float = 0.0, foreach: bool | None = None, *, capturable: bool = False,
                 maximize: bool = False, differentiable: bool = False, weight_decay_mode: str = "coupled",
                 fused: bool = False) -> None:
        super().__init__(params, dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, foreach=foreach,
                                      capturable=capturable, maximize=maximize, differentiable=differentiable,
                                      weight_decay_mode=weight_decay_mode, fused=fused))

    def scalars(self, group: dict[str, Any], t: float) -> dict[str, float]:
        return dict(step=-group["lr"])

    @staticmethod
    def kernel(group, p, g, s, c):
        rho, eps = group["rho"], group["eps"]
        v = s["square_avg"].mul_(rho).addcmul_(g, g, value=1 - rho)        # v_t
        u = s["acc_delta"]
        delta = u.add(eps).div_(v.add(eps)).sqrt_().mul_(g)                # sqrt((u + eps)/(v_t + eps)) g
        u.mul_(rho).addcmul_(delta, delta, value=1 - rho)                  # u_t
        p.add_(delta, alpha=c["step"])                                     # theta -= lr delta


register(Adadelta, "Adadelta (Zeiler, 2012): step sizes from running averages of steps and gradients",
         compare_lr=1.0)
