"""Compass (alias LodeW): Adam-like, with an amplified first moment and gradient centralization."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from ..base import Optimizer, ParamsT
from ..constraints import beta_tuple, boolean, non_negative, real
from ..registry import register
from ..tensorlist import TensorList


def centralize(g: TensorList, c: float, min_dim: int = 0) -> TensorList:
    """g - c * mean(g over all dims but the first), for tensors with more than ``min_dim`` dims.
    A 1-D (or 0-D) tensor has no dims but the first to average over: it is centralized by the
    mean of all its entries."""
    return TensorList(_centralize(x, c) if x.dim() > min_dim else x for x in g)


def _centralize(x: Tensor, c: float) -> Tensor:
    # mean(dim=()) means every dim for a plain tensor, but only the local shard for a DTensor
    mean = x.mean(dim=tuple(range(1, x.dim())), keepdim=True) if x.dim() > 1 else x.mean()
    return x - mean.mul_(c)


class Compass(Optimizer):
    r"""Compass (alias ``LodeW``): Adam with an amplified first moment and gradient
    centralization.

    By default this is exactly the Compass of the sd-scripts custom-optimizer guide (the
    optimizer its users select with ``--optimizer_type=LodeW``), except that ``p.grad`` is left
    as it was (that code writes the centralized, amplified gradient into it):

    .. math::
        g_t &\leftarrow g_t - c\cdot \operatorname{mean}_{\text{dims}>0}(g_t)
              \quad (\text{centralization } c\text{; a 1-D tensor: the mean of all entries}) \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
        g'_t &= g_t + a\, m_t \quad (a = \text{amp\_fac}) \\
        v_t &= \beta_2 v_{t-1} + (1 - \beta_2) {g'_t}^2 \\
        \eta_t &= \mathrm{lr} / (1 - \beta_1^t) \\
        \theta_t &= \theta_{t-1}(1 - \eta_t \lambda) - \eta_t\,
            \frac{g'_t}{\sqrt{v_t} / \sqrt{1 - \beta_2^t} + \epsilon}

    lodestone-rock's original Compass computes the same update with default
    ``betas=(0.99, 0.999)``; pass them to reproduce it. ``centralize_1d=False`` centralizes only
    tensors of two or more dims (weights of linear and conv layers), as the gradient
    centralization paper (Yong et al., 2020) does; biases and norm weights are then left as
    they are.

    Weight decay is decoupled and scaled by the bias-corrected step size :math:`\eta_t`.
    Complex parameters are refused (centralization is defined over real entries). With
    ``centralization`` on, the update of an entry depends on its whole row (on the whole
    tensor for 1-D tensors): a NaN gradient spreads along it.
    State: ``step``, ``ema`` (m), ``ema_squared`` (v).
    """

    constraints = dict(betas=beta_tuple(2), amp_fac=non_negative, eps=non_negative,
                       centralization=real, centralize_1d=boolean)
    state_names = ("ema", "ema_squared")
    state_kinds = dict(ema_squared="non_negative")
    supports_complex = False

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 amp_fac: float = 2.0, eps: float = 1e-8, weight_decay: float = 0.0,
                 centralization: float = 0.0, *, centralize_1d: bool = True,
                 weight_decay_mode: str = "decoupled", maximize: bool = False, fused: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, amp_fac=amp_fac, eps=eps,
                                      weight_decay=weight_decay, centralization=centralization,
                                      centralize_1d=centralize_1d, weight_decay_mode=weight_decay_mode,
                                      maximize=maximize, fused=fused))

    def decay_lr(self, group: dict[str, Any], t: list[float]) -> list[float]:
        b1 = group["betas"][0]
        return [group["lr"] / (1 - b1**k) for k in t]               # eta_t

    def transform_grads(self, group: dict[str, Any], g: TensorList) -> TensorList:
        c = group["centralization"]
        return centralize(g, c, min_dim=0 if group["centralize_1d"] else 1) if c != 0 else g

    def scalars(self, group: dict[str, Any], t: float) -> dict[str, float]:
        (b1, b2), lr = group["betas"], group["lr"]
        c = math.sqrt(1 - b2**t)        # bias corrections folded into scalars, as in Adam
        return dict(eps=group["eps"] * c, step=-lr * c / (1 - b1**t))

    @staticmethod
    def kernel(group, p, g, s, c):
        b1, b2 = group["betas"]
        m, v = s["ema"], s["ema_squared"]
        m.lerp_(g, 1 - b1)                                          # m_t
        g = g.add(m, alpha=group["amp_fac"])                        # g'_t = g + a m_t
        v.mul_(b2).addcmul_(g, g, value=1 - b2)                     # v_t
        p.addcdiv_(g, v.sqrt().add_(c["eps"]), c["step"])           # theta -= eta_t g' / denom


LodeW = Compass  # the name training scripts use (`--optimizer_type LodeW`)

register(Compass, "Compass: Adam-like, amplified first moment, gradient centralization",
         aliases=("lodew",))
