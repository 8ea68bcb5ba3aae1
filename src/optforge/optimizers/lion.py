"""Lion: the sign of an interpolated momentum, with decoupled weight decay."""

from __future__ import annotations

from typing import Any

from ..base import Optimizer, ParamsT
from ..constraints import beta_tuple
from ..registry import register


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
    reference's ``p *= 1 - lr * wd``). A NaN or inf gradient makes the parameter NaN, as in
    torch.optim (``torch.sign(nan)`` is 0: the reference would freeze the parameter instead,
    silently). State: ``step``, ``exp_avg`` (m).
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
        # zero: 0 as a step scalar, so the compiler cannot fold 0 * u away
        return dict(step=-group["lr"], zero=0.0)

    @staticmethod
    def kernel(group, p, g, s, c):
        b1, b2 = group["betas"]
        m = s["exp_avg"]
        u = g.add(m, alpha=b1 / (1 - b1))                    # c_t / (1 - b1): same sign, one pass
        sign = u.sign()
        p.add_(sign, alpha=c["step"])                        # theta -= lr sign(c_t)
        p.addcmul_(u, sign, value=c["zero"])                 # + 0 |c_t|: torch.sign(NaN) is 0, so
                                                             # this is what lets NaN/inf reach theta
        m.lerp_(g, 1 - b2)                                   # m_t = b2 m + (1 - b2) g


register(Lion, "Lion: sign of interpolated momentum, decoupled decay (Chen et al., 2023)",
         compare_lr=1e-3)
