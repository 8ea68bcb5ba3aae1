"""Rprop: resilient backpropagation (torch.optim semantics)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..base import Optimizer, ParamsT
from ..constraints import real_tuple
from ..registry import register


class Rprop(Optimizer):
    r"""Rprop (Riedmiller & Braun, 1993), as ``torch.optim.Rprop`` computes it. Each
    coordinate has its own step size :math:`\delta`, which grows while the gradient keeps its
    sign and shrinks when it flips:

    .. math::
        s &= \operatorname{sign}(g_t\, g'_{t-1}), \qquad
        \delta_t = \operatorname{clip}\big(\delta_{t-1} \cdot
            \{\eta_+ \text{ if } s > 0;\ \eta_- \text{ if } s < 0;\ 1 \text{ else}\},
            \ \delta_{\min}, \delta_{\max}\big) \\
        g'_t &= 0 \text{ where } s < 0 \text{, else } g_t, \qquad
        \theta_t = \theta_{t-1} - \operatorname{sign}(g'_t)\, \delta_t

    with :math:`(\eta_-, \eta_+)` the ``etas``, :math:`(\delta_{\min}, \delta_{\max})` the
    ``step_sizes`` and :math:`\delta_0 = \mathrm{lr}` (the group lr at the parameter's first
    step; later lr changes do not reach it, as in torch). State: ``step``, ``prev`` (g'),
    ``step_size`` (:math:`\delta`).

    torch's signature (``foreach``, ``capturable``, ``differentiable``: see
    :mod:`optforge.torch_compat`); ``weight_decay`` (coupled, default 0), which torch's Rprop
    has not, is optforge's. The update selects per coordinate, so it has no fused kernel
    (``fused=True`` is a ValueError).
    """

    no_fused_reason = ("it picks each step size by the sign of the gradient change, a choice per element "
                       "the fused kernel does not express")
    constraints = dict(etas=real_tuple(2), step_sizes=real_tuple(2))
    elementwise_update = True
    state_names = ("prev", "step_size")
    state_kinds = dict(step_size="non_negative")

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-2, etas: tuple[float, float] = (0.5, 1.2),
                 step_sizes: tuple[float, float] = (1e-6, 50), *, capturable: bool = False,
                 foreach: bool | None = None, maximize: bool = False, differentiable: bool = False,
                 weight_decay: float = 0.0, weight_decay_mode: str = "coupled", fused: bool = False) -> None:
        super().__init__(params, dict(lr=lr, etas=etas, step_sizes=step_sizes, capturable=capturable,
                                      foreach=foreach, maximize=maximize, differentiable=differentiable,
                                      weight_decay=weight_decay, weight_decay_mode=weight_decay_mode,
                                      fused=fused))

    def check_group(self, group: dict[str, Any]) -> None:
        minus, plus = group["etas"]
        if not 0.0 < minus < 1.0 < plus:
            raise ValueError(f"invalid etas={group['etas']!r}: expected 0 < etas[0] < 1 < etas[1]")

    def init_state(self, group: dict[str, Any], p: Tensor, name: str) -> Tensor:
        if name == "step_size":
            lr = float(group["lr"])
            return torch.full_like(p, complex(lr, lr) if p.is_complex() else lr,
                                   memory_format=torch.preserve_format)
        return super().init_state(group, p, name)

    def state_shape(self, group: dict[str, Any], p: Tensor, name: str) -> tuple[int, ...]:
        return tuple(p.shape)

    def update(self, group, p, g, s, t) -> None:
        minus, plus = group["etas"]
        low, high = group["step_sizes"]
        prev, step_size = s["prev"], s["step_size"]
        big = _number(p[0], torch.finfo(p[0].dtype).max)
        # Every choice is arithmetic that is exact on s in {-1, 0, 1} (torch.sign(nan) is 0),
        # so the bucket runs foreach, one kernel per line, and rounds as torch's Rprop.
        flip = g.mul(prev).sign_()                              # s = sign(g_t g'_{t-1})
        scaled = flip.clamp_min(1).add_(flip, alpha=big)        # 1 + big s: -big, 1, big
        held = scaled.mul(big).mul_(big).clamp_min_(0)          # 0 where s < 0, else inf
        prev.copy_(g).maximum_(held.neg()).minimum_(held)       # g'_t = g_t clamped into +-held
        step_size.mul_(scaled.clamp_(minus, plus)).clamp_(low, high)   # eta-, 1, eta+ by s
        p.addcmul_(prev.sign(), step_size, value=-1)            # theta -= sign(g'_t) delta_t


def _number(like: Tensor, value: float) -> Any:
    """``value`` (exact in ``like``'s dtype) as a factor of foreach products with tensors like
    ``like``: a 0-d tensor of that dtype on the CPU, where ATen's foreach would otherwise wrap the
    Python number in a new tensor for every tensor of the list (several times the op's cost on
    small tensors)."""
    return torch.tensor(value, dtype=like.dtype) if like.device.type == "cpu" else value


register(Rprop, "Rprop (Riedmiller & Braun, 1993): per-coordinate step sizes from gradient signs")
