"""Rprop: resilient backpropagation (torch.optim semantics)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..base import Optimizer, ParamsT
from ..constraints import real_tuple
from ..precision import computes_in_float32
from ..registry import register
from ..tensorlist import TensorList


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
    has not, is optforge's. The eager update runs foreach over each bucket (large CPU buckets in
    cache-sized chunks), its per-coordinate choices written as arithmetic that is exact on the
    signs, so parameters and state equal torch's bit for bit, inf and NaN gradients included.
    It has no fused kernel (``fused=True`` is a ValueError).
    """

    no_fused_reason = ("its per-element choices of step size are written for the foreach path, not as "
                       "the elementwise kernel the fused path compiles")
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

    def check_dtype(self, group: dict[str, Any], dtype: torch.dtype) -> None:
        # the step sizes are tensors of the dtype the update runs in: a value beyond its range
        # would fail part-way through a step
        if computes_in_float32(group, dtype):
            dtype = torch.float32
        largest = torch.finfo(dtype).max
        for name in ("lr", "etas", "step_sizes"):
            value = group[name]
            values = value if isinstance(value, (tuple, list)) else (value,)
            if any(abs(float(v)) > largest for v in values):
                raise ValueError(f"{name}={value!r} does not fit {dtype} parameters "
                                 f"(largest finite value {largest:g})")

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
        big, inf, ones = _constants(p)
        # Every choice is arithmetic that is exact on s in {-1, 0, 1} (torch.sign(nan) is 0), so
        # the bucket runs foreach, one kernel per line, and rounds as torch's Rprop; prev's
        # memory holds s, then the step size factor, then g'_t.
        prev.mul_(g).sign_()                                    # s = sign(g_t g'_{t-1})
        prev.mul_(big).add_(ones)                               # 1 + big s: -big, 1, big
        held = prev.mul(inf).clamp_min_(0)                      # 0 where s < 0, else inf
        step_size.mul_(prev.clamp_(minus, plus)).clamp_(low, high)   # times eta-, 1, eta+
        prev.copy_(held).neg_().maximum_(g).minimum_(held)      # g'_t = g_t clamped into +-held
        p.addcmul_(prev.sign(), step_size, value=-1)            # theta -= sign(g'_t) delta_t


def _constants(p: TensorList) -> tuple[Any, Any, Any]:
    """The largest finite number of ``p``'s dtype, inf and 1 as operands of foreach arithmetic on
    ``p``. On the CPU, 0-d tensors of that dtype (1 as a list of them, one per tensor): ATen's
    foreach would otherwise wrap a Python number in a new tensor for every tensor of the list,
    and adds a single tensor operand tensor by tensor as slowly (several times a product's cost
    on small tensors). The same numbers, rounded alike."""
    big = torch.finfo(p[0].dtype).max
    if p[0].device.type != "cpu":
        return big, math.inf, 1.0
    big, inf, one = (torch.tensor(v, dtype=p[0].dtype) for v in (big, math.inf, 1.0))
    return big, inf, [one] * len(p)


register(Rprop, "Rprop (Riedmiller & Braun, 1993): per-coordinate step sizes from gradient signs")
