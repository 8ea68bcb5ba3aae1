"""MARS: variance-reduced (STORM-style) gradients inside an AdamW update."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..base import Optimizer, ParamsT
from ..constraints import beta_tuple, boolean, non_negative
from ..registry import register


class MARS(Optimizer):
    r"""MARS-AdamW (Yuan et al., "MARS: Unleashing the Power of Variance Reduction for
    Training Large Models", 2024, arXiv:2411.10438, Algorithm 1 with the AdamW
    preconditioner and the "approx" gradient difference), with the defaults of the official
    code (AGI-Arena/MARS ``MARS``: ``mars_type="mars-adamw"``, ``is_approx=True``).

    For each tensor, with :math:`k = \gamma \beta_1 / (1 - \beta_1)` and :math:`g_0 = g_1`:

    .. math::
        c_t &= g_t + k\,(g_t - g_{t-1}), \qquad
        \tilde{c}_t = c_t / \max(1, \lVert c_t \rVert_2) \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) \tilde{c}_t, \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) \tilde{c}_t^2 \\
        \theta_t &= \theta_{t-1}(1 - \mathrm{lr}\,\lambda) - \frac{\mathrm{lr}}{1 - \beta_1^t}
            \cdot \frac{m_t}{\sqrt{v_t} / \sqrt{1 - \beta_2^t} + \epsilon}

    With ``optimize_1d=False`` (the reference's default) tensors with fewer than 2 dimensions
    get plain AdamW (:math:`\tilde{c}_t = g_t`) with the group's hyperparameters, as
    ``timm.optim.Mars`` does. Where this follows which reference:

    - the paper and timm: the first step has no gradient difference (:math:`c_1 = g_1`; the
      official code starts ``last_grad`` at zero, so its :math:`c_1 = (1 + k) g_1`), and
      "matrix" means ``ndim >= 2`` (the official code: exactly 2, so conv kernels get AdamW);
    - the official code's separate 1-D hyperparameters (``betas_1d=(0.9, 0.95)``,
      ``lr_1d=3e-3``, ``weight_decay_1d=0.1``) are a param group here: put the 1-D tensors in
      a group with those values. Not implemented: ``amsgrad``, ``mars-lion``/``mars-shampoo``,
      the exact (``is_approx=False``) gradient difference.

    The clip needs a per-tensor norm, so there is no generated fused path (``fused=True`` is
    refused). ``c_t`` is formed from the gradient after ``maximize`` and coupled weight decay.
    State: ``step``, ``exp_avg`` (m), ``exp_avg_sq`` (v), ``last_grad`` (:math:`g_{t-1}`).
    """

    constraints = dict(betas=beta_tuple(2), eps=non_negative, gamma=non_negative, optimize_1d=boolean)
    state_names = ("exp_avg", "exp_avg_sq", "last_grad")
    supports_complex = False

    def __init__(self, params: ParamsT, lr: float = 3e-3, betas: tuple[float, float] = (0.95, 0.99),
                 eps: float = 1e-8, weight_decay: float = 0.0, gamma: float = 0.025,
                 optimize_1d: bool = False, *, weight_decay_mode: str = "decoupled",
                 maximize: bool = False, fused: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      gamma=gamma, optimize_1d=optimize_1d,
                                      weight_decay_mode=weight_decay_mode, maximize=maximize, fused=fused))

    def scalars(self, group: dict[str, Any], t: float) -> dict[str, float]:
        # Adam's folding: lr/(1-b1^t) m/(sqrt(v)/c + eps) = lr c/(1-b1^t) m/(sqrt(v) + eps c)
        b1, b2 = group["betas"]
        c = math.sqrt(1 - b2**t)
        return dict(eps=group["eps"] * c, step=-group["lr"] * c / (1 - b1**t))

    def update(self, group, p, g, s, t):
        (b1, b2), gamma = group["betas"], group["gamma"]
        m, v, last = s["exp_avg"], s["exp_avg_sq"], s["last_grad"]
        mars = [group["optimize_1d"] or x.dim() >= 2 for x in p]
        k = gamma * b1 / (1 - b1)
        c = g.sub(last)                                            # g_t - g_{t-1}
        c.mul_([k if on and step > 1 else 0.0 for on, step in zip(mars, t)]).add_(g)  # c_t
        last.copy_(g)                                              # g_{t-1} <- g_t
        clipped = c.select(mars)
        if clipped:
            norms = clipped.norm()
            torch._foreach_clamp_min_(norms, 1.0)
            clipped.div_(norms)                                    # c_t / max(1, ||c_t||)
        m.lerp_(c, 1 - b1)                                         # m_t = b1 m + (1 - b1) c_t
        v.mul_(b2).addcmul_(c, c, value=1 - b2)                    # v_t = b2 v + (1 - b2) c_t^2
        del c, clipped                                             # their memory serves the next temporary
        sc = self._expand_scalars(group, t)
        p.addcdiv_(m, v.sqrt().add_(sc["eps"]), sc["step"])        # AdamW step (decay: the base)


register(MARS, "MARS-AdamW: variance-reduced gradients in AdamW (Yuan et al., 2024)", elementwise=False)
