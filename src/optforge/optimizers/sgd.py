"""SGD (torch.optim semantics) and MomentumSGD (a velocity that holds the step)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..base import Optimizer, ParamsT
from ..constraints import boolean, non_negative, unit_interval
from ..registry import register


class SGD(Optimizer):
    r"""Stochastic gradient descent with momentum, dampening and Nesterov, as
    ``torch.optim.SGD`` computes it (Sutskever et al., 2013 for the momentum form):

    .. math::
        b_1 &= g_1, \qquad b_t = \mu\, b_{t-1} + (1 - \tau)\, g_t \\
        d_t &= g_t + \mu\, b_t \ \text{(nesterov)} \quad\text{else}\quad d_t = b_t \\
        \theta_t &= \theta_{t-1} - \mathrm{lr}\cdot d_t

    (with :math:`\mu = 0`, :math:`d_t = g_t`). State: ``step``, ``momentum_buffer`` (b, only
    when momentum > 0). Weight decay is coupled L2 by default.

    torch's signature (``foreach``, ``differentiable``, ``fused``: see :mod:`optforge.torch_compat`).
    Sparse gradients (``nn.Embedding(sparse=True)``) are supported as in torch: the update is
    the same, eager (``fused=True`` runs such a step eagerly). Unlike torch, whose momentum
    buffer of a sparse gradient is a sparse tensor that accumulates entries, the buffer is dense
    (the same values), and coupled weight decay works (torch raises): it makes the gradient dense.

    By default (``fused=None``) float32/float64 steps without dampening and with coupled (or no)
    weight decay run torch's fused SGD kernel, the same update in one pass (:mod:`optforge.paths`);
    ``fused=False`` forces the foreach path.
    """

    constraints = dict(momentum=non_negative, dampening=non_negative, nesterov=boolean)
    supports_sparse = True

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float | Tensor = 0.0, nesterov: bool = False, *,
                 maximize: bool = False, foreach: bool | None = None, differentiable: bool = False,
                 fused: bool | None = None, weight_decay_mode: str = "coupled") -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                                      foreach=foreach, differentiable=differentiable, fused=fused,
                                      weight_decay_mode=weight_decay_mode))

    def check_group(self, group: dict[str, Any]) -> None:
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(
                f"invalid nesterov=True with momentum={group['momentum']!r}, "
                f"dampening={group['dampening']!r}: Nesterov needs momentum > 0 and dampening = 0"
            )

    def state_names_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def scalars(self, group: dict[str, Any], t: float) -> dict[str, float]:
        # b_1 = g_1: the buffer starts at zero, so the first step adds g with weight 1
        return dict(step=-group["lr"], damp=1.0 if t == 1 else 1 - group["dampening"])

    @staticmethod
    def kernel(group, p, g, s, c):
        mu = group["momentum"]
        if mu == 0:
            p.add_(g, alpha=c["step"])                         # theta -= lr g
            return
        b = s["momentum_buffer"].mul_(mu).add_(g, alpha=c["damp"])  # b_t = mu b + (1 - tau) g
        d = g.add(b, alpha=mu) if group["nesterov"] else b     # d_t = g + mu b  |  b
        p.add_(d, alpha=c["step"])                             # theta -= lr d

    def native_fused(self, group: dict[str, Any]) -> bool:
        # torch's fused SGD: coupled decay only; with zero-initialised buffers its
        # is_first_step=False equals b_1 = g_1 only when there is no dampening
        return group["weight_decay_mode"] == "coupled" and group["dampening"] == 0

    def fused_update(self, group, p, g, s, steps, grad_scale=None, found_inf=None):
        torch._fused_sgd_(p, g, s.get("momentum_buffer", []), weight_decay=group["weight_decay"],
                          momentum=group["momentum"], lr=group["lr"], dampening=0.0,
                          nesterov=group["nesterov"], maximize=group["maximize"],
                          is_first_step=False, grad_scale=grad_scale, found_inf=found_inf)


class MomentumSGD(Optimizer):
    r"""Momentum SGD with a velocity that holds the whole step, lr included:

    .. math::
        \Delta w_t &= \mu\, \Delta w_{t-1} - \mathrm{lr}\cdot g_t \\
        w_t &= w_{t-1} + \Delta w_t

    Equal to ``SGD(momentum=mu)`` for a constant lr; unlike it, a changed lr only scales new
    gradients, not the accumulated velocity. State: ``step``, ``velocity`` (:math:`\Delta w`).
    """

    constraints = dict(momentum=unit_interval)
    state_names = ("velocity",)

    def __init__(self, params: ParamsT, lr: float = 0.01, momentum: float = 0.9,
                 weight_decay: float = 0.0, *, weight_decay_mode: str = "coupled",
                 maximize: bool = False, fused: bool = False) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      weight_decay_mode=weight_decay_mode, maximize=maximize, fused=fused))

    def scalars(self, group: dict[str, Any], t: float) -> dict[str, float]:
        return dict(step=-group["lr"])

    @staticmethod
    def kernel(group, p, g, s, c):
        dw = s["velocity"].mul_(group["momentum"]).add_(g, alpha=c["step"])  # dw <- mu dw - lr g
        p.add_(dw)                                                           # w <- w + dw


register(SGD, "SGD with momentum, dampening and Nesterov (torch.optim semantics)", compare_lr=0.1)
register(MomentumSGD, "Momentum SGD, velocity form: dw = mu dw - lr g; w += dw", name="momentum_sgd",
         aliases=("momentumsgd",))
