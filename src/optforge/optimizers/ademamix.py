"""AdEMAMix: Adam with a mixture of a fast and a slow EMA of the gradient."""

from __future__ import annotations

import math
from typing import Any

from ..base import Optimizer, ParamsT
from ..constraints import beta_tuple, integer_at_least, non_negative
from ..registry import register


def alpha_at(t: float, alpha: float, warmup: int | None) -> float:
    r""":math:`\alpha_t = \min(t / T_\alpha, 1)\,\alpha` (linear from 0); no warmup: 0 or None."""
    if not warmup or t >= warmup:
        return alpha
    return t / float(warmup) * alpha


def beta3_at(t: float, beta1: float, beta3: float, warmup: int | None) -> float:
    r""":math:`\beta_{3,t}`: the half-life :math:`f(\beta) = \ln 0.5 / \ln \beta - 1` grows
    linearly from :math:`f(\beta_1)` to :math:`f(\beta_3)` over :math:`T_{\beta_3}` steps,
    :math:`\beta_{3,t} = f^{-1}((1 - a) f(\beta_1) + a f(\beta_3))`, :math:`a = t / T_{\beta_3}`
    (the reference's ``linear_hl_warmup_scheduler``, its ``1e-8`` inside the log included,
    but dropped where :math:`\beta + 10^{-8} \ge 1`, which would divide by zero)."""
    if not warmup or t >= warmup:
        return beta3
    a = t / float(warmup)

    def f(beta: float) -> float:
        return math.log(0.5) / math.log(beta + 1e-8 if beta + 1e-8 < 1 else beta) - 1

    return math.pow(0.5, 1 / ((1.0 - a) * f(beta1) + a * f(beta3) + 1))


class AdEMAMix(Optimizer):
    r"""AdEMAMix (Pagliardini, Ablin & Grangier, 2024, "The AdEMAMix Optimizer: Better, Faster,
    Older", Algorithm 1), as the authors' reference (github.com/apple/ml-ademamix,
    ``pytorch/ademamix.py``) computes it, with its defaults.

    .. math::
        m^{(1)}_t &= \beta_1 m^{(1)}_{t-1} + (1 - \beta_1) g_t \qquad \text{(fast EMA)} \\
        m^{(2)}_t &= \beta_{3,t} m^{(2)}_{t-1} + (1 - \beta_{3,t}) g_t \qquad \text{(slow EMA)} \\
        v_t &= \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
        \theta_t &= \theta_{t-1} - \mathrm{lr}\left(
            \frac{m^{(1)}_t / (1 - \beta_1^t) + \alpha_t m^{(2)}_t}
                 {\sqrt{v_t / (1 - \beta_2^t)} + \epsilon} + \lambda \theta_{t-1}\right)

    The slow EMA is not bias-corrected. With ``alpha_warmup`` :math:`T_\alpha`,
    :math:`\alpha_t` grows linearly from 0 to ``alpha``; with ``beta3_warmup``
    :math:`T_{\beta_3}`, :math:`\beta_{3,t}` grows from :math:`\beta_1` to ``beta3`` linearly
    in half-life (see :func:`beta3_at`); the paper sets both to the run length, 0 (the
    default) is no warmup (the reference's ``None``). ``betas=(b1, b2, b3)`` as in the
    reference (:math:`\beta_1, \beta_2, \beta_3`). Weight decay
    is decoupled (:math:`\lambda`, scaled by lr, as the reference). State: ``step``,
    ``exp_avg_fast`` (m1), ``exp_avg_slow`` (m2), ``exp_avg_sq`` (v): the reference's names.
    """

    constraints = dict(betas=beta_tuple(3), eps=non_negative, alpha=non_negative,
                       beta3_warmup=integer_at_least(0), alpha_warmup=integer_at_least(0))
    state_names = ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq")
    state_kinds = dict(exp_avg_slow="slow", exp_avg_sq="non_negative")

    def __init__(self, params: ParamsT, lr: float = 1e-3,
                 betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
                 alpha: float = 2.0, beta3_warmup: int = 0, alpha_warmup: int = 0,
                 eps: float = 1e-8,
                 weight_decay: float = 0.0, *, weight_decay_mode: str = "decoupled",
                 maximize: bool = False, fused: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, alpha=alpha, beta3_warmup=beta3_warmup,
                                      alpha_warmup=alpha_warmup, eps=eps, weight_decay=weight_decay,
                                      weight_decay_mode=weight_decay_mode, maximize=maximize, fused=fused))

    def scalars(self, group: dict[str, Any], t: float) -> dict[str, float]:
        # Bias correction of v folded into scalars: multiply numerator and denominator by
        # c = sqrt(1 - b2^t): lr (m1/bc1 + alpha m2) / (sqrt(v)/c + eps)
        #                   = (lr c/bc1 m1 + lr c alpha m2) / (sqrt(v) + eps c)
        b1, b2, b3 = group["betas"]
        lr, c = group["lr"], math.sqrt(1 - b2**t)
        alpha = alpha_at(t, group["alpha"], group["alpha_warmup"])
        beta3 = beta3_at(t, b1, b3, group["beta3_warmup"])
        return dict(slow_weight=1 - beta3, fast=-lr * c / (1 - b1**t), slow=-lr * c * alpha,
                    eps=group["eps"] * c)

    @staticmethod
    def kernel(group, p, g, s, c):
        b1, b2, _ = group["betas"]
        m1, m2, v = s["exp_avg_fast"], s["exp_avg_slow"], s["exp_avg_sq"]
        m1.lerp_(g, 1 - b1)                                  # m1_t = b1 m1 + (1 - b1) g
        m2.lerp_(g, c["slow_weight"])                        # m2_t = b3_t m2 + (1 - b3_t) g
        v.mul_(b2).addcmul_(g, g, value=1 - b2)              # v_t = b2 v + (1 - b2) g^2
        den = v.sqrt().add_(c["eps"])                        # sqrt(v_t) + eps c
        p.addcdiv_(m1, den, c["fast"])                       # theta -= lr c m1_t / bc1 / den
        p.addcdiv_(m2, den, c["slow"])                       # theta -= lr c alpha_t m2_t / den


register(AdEMAMix, "AdEMAMix: Adam with a fast and a slow EMA mixed (Pagliardini et al., 2024)")
