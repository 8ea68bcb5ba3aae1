"""ASGD: averaged stochastic gradient descent (torch.optim semantics)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..base import Optimizer, ParamsT, _step_dtype
from ..constraints import non_negative
from ..registry import register
from .scalar_state import as_scalar_tensor, load_keeping_scalars


class ASGD(Optimizer):
    r"""Averaged SGD (Polyak & Juditsky, 1992), as ``torch.optim.ASGD`` computes it:

    .. math::
        \theta_t &= \theta_{t-1} (1 - \lambda \eta_{t-1}) - \eta_{t-1} g_t \\
        \bar\theta_t &= \bar\theta_{t-1} + \mu_{t-1} (\theta_t - \bar\theta_{t-1})
            \quad (\bar\theta_t = \theta_t \text{ while } \mu_{t-1} = 1) \\
        \eta_t &= \frac{\mathrm{lr}}{(1 + \lambda\, \mathrm{lr}\, t)^{\alpha}}, \qquad
        \mu_t = \frac{1}{\max(1, t - t_0)}, \qquad \eta_0 = \mathrm{lr}, \ \mu_0 = 1

    with :math:`\lambda` the ``lambd``; averaging starts after step :math:`t_0`. The average
    :math:`\bar\theta` (``ax``) is for evaluation: the parameters themselves are not
    averaged. State: ``step``, ``eta``, ``mu`` (0-d tensors in the step's dtype, as torch
    keeps them), ``ax``.

    torch's signature (``foreach``, ``differentiable``, ``capturable``: see
    :mod:`optforge.torch_compat`). The averaging branches on ``mu``, so there is no fused kernel
    (``fused=True`` is a ValueError).
    """

    no_fused_reason = ("it keeps its step size and averaging weight per tensor (torch's eta and mu) and "
                       "starts the averaging after t0")
    constraints = dict(lambd=non_negative, alpha=non_negative, t0=non_negative)
    state_names = ("ax",)
    state_kinds = dict(ax="full")       # an average of iterates, not a moment

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-2, lambd: float = 1e-4, alpha: float = 0.75,
                 t0: float = 1e6, weight_decay: float = 0.0, foreach: bool | None = None,
                 maximize: bool = False, differentiable: bool = False, capturable: bool = False, *,
                 weight_decay_mode: str = "coupled", fused: bool = False) -> None:
        super().__init__(params, dict(lr=lr, lambd=lambd, alpha=alpha, t0=t0, weight_decay=weight_decay,
                                      foreach=foreach, maximize=maximize, differentiable=differentiable,
                                      capturable=capturable, weight_decay_mode=weight_decay_mode,
                                      fused=fused))
        self._etas: list[float] = []   # the current bucket's eta_{t-1} and mu_{t-1}, one per param
        self._mus: list[float] = []

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """See :func:`optforge.optimizers.scalar_state.load_keeping_scalars`."""
        load_keeping_scalars(self, state_dict, ("eta", "mu"), super().load_state_dict)

    def step_group(self, group: dict[str, Any], buckets: list) -> None:
        lr, lambd, alpha, t0 = group["lr"], group["lambd"], group["alpha"], group["t0"]
        for b in buckets:
            for st in b.states:
                st["eta"] = as_scalar_tensor(st.get("eta", lr), _step_dtype())
                st["mu"] = as_scalar_tensor(st.get("mu", 1.0), _step_dtype())
            self._etas = [float(st["eta"]) for st in b.states]
            self._mus = [float(st["mu"]) for st in b.states]
            w = self.prepare(group, b)
            self.update(group, w.p, w.g, w.s, w.t)
            self.finish(group, w)
            for st, t in zip(b.states, w.t):   # eta_t, mu_t, rounded to the state's dtype
                st["eta"].copy_(torch.as_tensor(lr / ((1 + lambd * lr * t) ** alpha)))
                st["mu"].copy_(torch.as_tensor(1 / max(1, t - t0)))

    def update(self, group, p, g, s, t) -> None:
        lambd = group["lambd"]
        for param, grad, ax, eta, mu in zip(p, g, s["ax"], self._etas, self._mus):
            param.mul_(1 - lambd * eta)                  # theta (1 - lambda eta)
            param.add_(grad, alpha=-eta)                 # ... - eta g
            if mu != 1:
                ax.add_(param.sub(ax).mul_(mu))          # ax += mu (theta - ax)
            else:
                ax.copy_(param)


register(ASGD, "ASGD: SGD with Polyak-Ruppert parameter averaging (Polyak & Juditsky, 1992)")
