"""ADOPT: Adam that normalizes the gradient by the second moment of the previous step."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..base import Optimizer, ParamsT
from ..constraints import beta_tuple, boolean, non_negative
from ..registry import register
from ..tensorlist import TensorList


class _ClampList(TensorList):
    """The lists ADOPT's eager path runs its kernel on: ``maximum_`` with a number is
    ``torch._foreach_clamp_min_`` (the same result, NaN included), which DTensor (FSDP2) can
    shard; it has no sharding rule for ``_foreach_maximum_`` with a scalar. ``sqrt`` keeps
    this type, as the kernel calls ``maximum_`` on its result."""

    def sqrt(self) -> _ClampList:
        return _ClampList(super().sqrt())

    def maximum_(self, other) -> _ClampList:
        if isinstance(other, (list, tuple)) and other and isinstance(other[0], torch.Tensor):
            return super().maximum_(other)
        torch._foreach_clamp_min_(self, other)
        return self


class ADOPT(Optimizer):
    r"""ADOPT (Taniguchi et al., 2024, "ADOPT: Modified Adam Can Converge with Any
    :math:`\beta_2` with the Optimal Rate", Algorithm 2 with the clipping of the updated
    arXiv version), as the authors' ``torch-adopt`` 0.1.0 (github.com/iShohei220/adopt)
    computes it, with its defaults (its ``clip_lambda = lambda step: step**0.25`` is
    ``clip=True, clip_exponent=0.25``).

    The first step only initializes the second moment, :math:`v_1 = g_1^2`. From then on,
    with :math:`c_t = (t-1)^{\texttt{clip\_exponent}}` (the reference's ``step`` counts from 0):

    .. math::
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1)
               \,\mathrm{clip}\!\left(\frac{g_t}{\max(\sqrt{v_{t-1}}, \epsilon)}, -c_t, c_t\right) \\
        \theta_t &= \theta_{t-1} - \mathrm{lr}\, m_t \\
        v_t &= \beta_2 v_{t-1} + (1 - \beta_2) g_t^2

    The gradient is normalized by the second moment of the *previous* step, so it is
    independent of :math:`v` (the paper's fix of Adam's non-convergence for any
    :math:`\beta_2`). ``clip=False`` disables clipping (the paper's first version, ``clip_lambda=None``).
    Weight decay is coupled L2 by default, as in the reference (``decouple=False``);
    ``weight_decay_mode="decoupled"`` is the reference's ``decouple=True``
    (:math:`\theta \leftarrow \theta(1 - \mathrm{lr}\,\lambda)`, not on the first step).

    The step-1 special case is expressed through scalars, so one kernel serves every step:
    at :math:`t = 1` the v coefficients are (1, 1) (v = 0 + g^2), the normalized gradient is
    :math:`g / \max(\sqrt{0}, \infty) = 0` and the momentum weight and step size are 0.
    State: ``step``, ``exp_avg`` (m), ``exp_avg_sq`` (v).
    """

    constraints = dict(betas=beta_tuple(2), eps=non_negative, clip=boolean, clip_exponent=non_negative)
    state_names = ("exp_avg", "exp_avg_sq")
    state_kinds = dict(exp_avg_sq="non_negative")

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.9999),
                 eps: float = 1e-6, clip: bool = True, clip_exponent: float = 0.25,
                 weight_decay: float = 0.0, *,
                 weight_decay_mode: str = "coupled", maximize: bool = False, fused: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, clip=clip, clip_exponent=clip_exponent,
                                      weight_decay=weight_decay, weight_decay_mode=weight_decay_mode,
                                      maximize=maximize, fused=fused))

    def scalars(self, group: dict[str, Any], t: float) -> dict[str, float]:
        b1, b2 = group["betas"]
        first = t == 1
        clip = (t - 1) ** group["clip_exponent"]
        return dict(
            eps=math.inf if first else group["eps"],         # t = 1: u = g / inf = 0 (eps may be 0)
            clip_low=-clip, clip_high=clip,                  # -c_t, c_t
            m_weight=0.0 if first else 1 - b1,               # t = 1: m stays 0
            step=0.0 if first else -group["lr"],             # t = 1: no update
            v_keep=1.0 if first else b2,                     # t = 1: v = 0 * 1 + 1 * g^2
            v_new=1.0 if first else 1 - b2,
        )

    def update(self, group, p, g, s, t):
        wrap = _ClampList
        self.kernel(group, wrap(p), wrap(g), {k: wrap(v) for k, v in s.items()},
                    self._expand_scalars(group, t))

    def decay_lr(self, group: dict[str, Any], t: list[float]) -> list[float]:
        return [0.0 if k == 1 else group["lr"] for k in t]   # no decoupled decay on step 1

    @staticmethod
    def kernel(group, p, g, s, c):
        m, v = s["exp_avg"], s["exp_avg_sq"]
        u = g.div(v.sqrt().maximum_(c["eps"]))               # g_t / max(sqrt(v_{t-1}), eps)
        if group["clip"]:
            u.clamp_(c["clip_low"], c["clip_high"])          # clip(u, -c_t, c_t)
        m.lerp_(u, c["m_weight"])                            # m_t = b1 m + (1 - b1) u
        p.add_(m, alpha=c["step"])                           # theta_t = theta - lr m_t
        v.mul_(c["v_keep"]).addcmul_(g, g, value=c["v_new"])  # v_t = b2 v + (1 - b2) g^2


register(ADOPT, "ADOPT: Adam normalized by the previous step's second moment (Taniguchi et al., 2024)")
