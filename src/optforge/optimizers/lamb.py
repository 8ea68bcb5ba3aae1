"""LAMB: Adam's direction scaled per tensor by a trust ratio (layer-wise adaptation)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..base import Optimizer, ParamsT
from ..constraints import beta_tuple, boolean, non_negative, positive
from ..distributed import full_norms
from ..registry import register
from ..tensorlist import numbers_on


class LAMB(Optimizer):
    r"""LAMB (You et al., 2020, "Large Batch Optimization for Deep Learning: Training BERT in
    76 minutes", Algorithm 2), with the weight-norm clamp of the reference implementations
    (cybertronai/pytorch-lamb, torch-optimizer): :math:`\phi(z) = \min(z, \text{clamp\_value})`.

    For each tensor :math:`x` (the trust ratio is per tensor: ``elementwise=False``):

    .. math::
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
        r_t &= \frac{m_t / (1 - \beta_1^t)}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon} + \lambda x_{t-1} \\
        \rho_t &= \frac{\phi(\lVert x_{t-1} \rVert)}{\lVert r_t \rVert}
            \quad (1 \text{ if either norm is } 0) \\
        x_t &= x_{t-1} - \mathrm{lr}\, \rho_t\, r_t

    ``debias=False`` drops the bias corrections (the references' default: "paper v3 does not
    use debiasing"); ``adam=True`` fixes :math:`\rho_t = 1` (Adam with the decay in the
    direction, for comparison, as the references offer).

    Weight decay: ``weight_decay_mode="decoupled"`` (the default) is LAMB's own,
    :math:`\lambda x` inside the direction :math:`r_t` and so inside the trust ratio (the base
    class's multiplicative decoupled decay is then not applied); ``"coupled"`` adds
    :math:`\lambda x` to :math:`g_t`, ``"absolute"`` multiplies :math:`x` by :math:`1 - \lambda`.

    Eager only: the per-tensor norms are ``torch._foreach_norm`` over the bucket (over every
    shard of a DTensor parameter, FSDP2 / tensor parallel), and the trust ratios stay on the
    device (no host sync). ``fused=True`` is refused (ValueError).
    State: ``step``, ``exp_avg`` (m), ``exp_avg_sq`` (v).
    """

    no_fused_reason = "its trust ratio needs the norms of each whole tensor"
    constraints = dict(betas=beta_tuple(2), eps=non_negative, clamp_value=positive, debias=boolean,
                       adam=boolean)
    state_names = ("exp_avg", "exp_avg_sq")
    shard_reductions = True      # the norms are TensorList.norm: over every shard of a DTensor

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, clamp_value: float = 10.0,
                 debias: bool = True, adam: bool = False, *, weight_decay_mode: str = "decoupled",
                 maximize: bool = False, fused: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      clamp_value=clamp_value, debias=debias, adam=adam,
                                      weight_decay_mode=weight_decay_mode, maximize=maximize, fused=fused))

    def decay_lr(self, group: dict[str, Any], t: list[float]) -> float:
        return 0.0    # "decoupled": LAMB's own decay, inside r_t (update()); the base's is a no-op

    def update(self, group, p, g, s, t):
        (b1, b2), eps, wd = group["betas"], group["eps"], group["weight_decay"]
        m, v = s["exp_avg"], s["exp_avg_sq"]
        m.lerp_(g, 1 - b1)                                    # m_t = b1 m + (1 - b1) g
        v.mul_(b2).addcmul_(g, g, value=1 - b2)               # v_t = b2 v + (1 - b2) g^2
        # Bias corrections folded in: r_t = k u with k = c2 / c1 per tensor and
        # u = m / (sqrt(v) + eps c2) (+ lambda x / k); rho_t r_t = phi(||x||) u / ||u||: k cancels.
        c1 = [1 - b1**n if group["debias"] else 1.0 for n in t]
        c2 = [math.sqrt(1 - b2**n) if group["debias"] else 1.0 for n in t]
        k = [b / a for a, b in zip(c1, c2)]
        u = v.sqrt().add_([eps * c for c in c2]).rdiv_(m)   # one temporary: the quotient in its denominator
        if group["weight_decay_mode"] == "decoupled" and wd != 0:
            u.add_(p, alpha=[wd / x for x in k])              # r_t / k = Adam direction / k + lambda x / k
        lr = float(group["lr"])
        if group["adam"]:
            p.add_(u, alpha=[-lr * x for x in k])             # x_t = x - lr r_t
            return
        norms = torch.stack(full_norms([*p, *u]))         # one reduction for DTensors (FSDP2, TP)
        w_norm = norms[:len(p)].clamp_(max=group["clamp_value"])           # phi(||x||)
        u_norm = norms[len(p):]                                            # ||r_t|| / k
        rho_k = k[0] if len(set(k)) == 1 else numbers_on(k, u_norm.dtype, u_norm.device)
        # rho_t k: phi(||x||) / ||u||, or k where rho_t = 1 (a norm is 0); on the device: no host sync
        scale = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, rho_k).mul_(-lr)
        p.addcmul_(u, list(scale.unbind()))                   # x_t = x - lr rho_t r_t

register(LAMB, "LAMB: Adam direction with a per-tensor trust ratio (You et al., 2020)",
         elementwise=False)
