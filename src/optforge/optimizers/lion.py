"""Lion: the sign of an interpolated momentum, with decoupled weight decay."""

from __future__ import annotations

from typing import Any

import torch

from ..base import Optimizer, ParamsT
from ..constraints import beta_tuple
from ..registry import register

#: sign(c) is computed as clamp(c, -unit, unit) / unit: exact (powers of two) for |c| >= unit,
#: with NaN kept. The unit is at most the smallest normal number of the dtype (float16: its
#: smallest subnormal, so exact everywhere), and lr / unit stays finite up to lr = 256.
SIGN_UNIT = {torch.float16: 2.0**-24, torch.float64: 2.0**-1000}
DEFAULT_SIGN_UNIT = 2.0**-120


class Lion(Optimizer):
    r"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2),
    as the PyPI package ``lion-pytorch`` computes it (its defaults too).

    .. math::
        \theta_{t-1} &\leftarrow \theta_{t-1} (1 - \mathrm{lr}\,\lambda) \\
        c_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
        \theta_t &= \theta_{t-1} - \mathrm{lr}\, \mathrm{sign}(c_t) \\
        m_t &= \beta_2 m_{t-1} + (1 - \beta_2) g_t

    The update has the same magnitude in every coordinate, so Lion wants an lr 3-10x smaller
    and a weight decay 3-10x larger than AdamW's. Weight decay is decoupled by default (the
    reference's ``p *= 1 - lr * wd``). A NaN gradient makes the parameter NaN, as in
    torch.optim (``torch.sign(nan)`` is 0: the reference would freeze the parameter instead,
    silently); an infinite one moves it by its sign, as the reference does. A nonzero
    :math:`c_t` smaller than about 1e-36 (float32, bfloat16; 1e-301 in float64) moves the
    parameter by less than lr. State: ``step``, ``exp_avg`` (m).
    """

    constraints = dict(betas=beta_tuple(2))
    state_names = ("exp_avg",)
    state_kinds = dict(exp_avg="sign")    # only the sign of the interpolation reaches the update

    def __init__(self, params: ParamsT, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, weight_decay_mode: str = "decoupled",
                 maximize: bool = False, fused: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay,
                                      weight_decay_mode=weight_decay_mode, maximize=maximize, fused=fused))

    def scalars(self, group: dict[str, Any], t: float) -> dict[str, float]:
        return dict(step=-group["lr"])

    @staticmethod
    def kernel(group, p, g, s, c):
        b1, b2 = group["betas"]
        m = s["exp_avg"]
        unit = SIGN_UNIT.get(p[0].dtype, DEFAULT_SIGN_UNIT)
        step = c["step"]
        step = [x / unit for x in step] if isinstance(step, list) else step / unit
        u = g.add(m, alpha=b1 / (1 - b1))                    # c_t / (1 - b1): same sign, one pass
        u.clamp_(-unit, unit)                                # unit sign(c_t); NaN stays NaN, where
                                                             # torch.sign(NaN) is 0
        p.add_(u, alpha=step)                                # theta -= lr sign(c_t): (lr/unit) unit
        m.lerp_(g, 1 - b2)                                   # m_t = b2 m + (1 - b2) g


register(Lion, "Lion: sign of interpolated momentum, decoupled decay (Chen et al., 2023)",
         compare_lr=1e-3)
