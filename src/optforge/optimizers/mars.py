"""MARS: variance-reduced (STORM-style) gradients inside an AdamW update."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from ..base import Bucket, Optimizer, ParamsT, Work
from ..constraints import beta_tuple, boolean, non_negative, one_of
from ..registry import register
from ..tensorlist import TensorList
from ..weight_decay import apply_weight_decay

#: ``variant="official"``: the authors' code; ``"timm"``: ``timm.optim.Mars``
VARIANTS = ("official", "timm")
#: (indices into a bucket, betas, lr, weight decay) of one kind of tensor
Kind = tuple[list[int], tuple[float, float], float, float]


def _pick(xs: list[Tensor], idx: list[int]) -> TensorList:
    return TensorList(xs[i] for i in idx)


class MARS(Optimizer):
    r"""MARS-AdamW (Yuan et al., "MARS: Unleashing the Power of Variance Reduction for
    Training Large Models", 2024, arXiv:2411.10438): AdamW on a variance-reduced gradient.

    ``variant="official"`` (the default) computes what the authors' code computes:
    ``MARS`` in ``MARS/optimizers/mars.py`` of github.com/AGI-Arena/MARS at commit
    ``4831e28eba863a4e69d7e9474ff8e73bc1b410fe``, with its defaults (all of them are this
    class's defaults too), ``mars_type="mars-adamw"`` and the approximate gradient difference
    ``is_approx=True``. ``variant="timm"`` computes ``timm.optim.Mars``, which follows the
    paper's Algorithm 1 on the first step. ``amsgrad`` (the official code's option) works with
    both.

    A *matrix* is a tensor with exactly 2 dims (official) or at least 2 dims (timm), or any
    tensor with ``optimize_1d=True``. For a matrix, with :math:`k = \gamma \beta_1 / (1 - \beta_1)`:

    .. math::
        c_t &= g_t + k\,(g_t - g_{t-1}), \qquad
        \tilde{c}_t = c_t / \max(1, \lVert c_t \rVert_2) \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) \tilde{c}_t, \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) \tilde{c}_t^2 \\
        \theta_t &= \theta_{t-1} - \mathrm{lr}_t \Big(\lambda\, \theta_{t-1}
            + \frac{m_t}{(1 - \beta_1^t)\,(\sqrt{v_t} / \sqrt{1 - \beta_2^t} + \epsilon)}\Big)

    with :math:`v_t` replaced by :math:`\max(v_t, \text{its previous maximum})` in the step
    when ``amsgrad``. The first step: official :math:`g_0 = 0` (the gradient memory starts at
    zero, so :math:`c_1 = (1 + k) g_1`); timm :math:`c_1 = g_1`.

    Every other tensor (1-D biases and norm gains; with the official rule also conv kernels
    and scalars) gets AdamW on :math:`g_t` (the same lines with :math:`\tilde{c}_t = g_t`):

    - official: with ``betas_1d``, ``weight_decay_1d`` (whatever the group's
      ``weight_decay``: pass ``weight_decay_1d=0`` to leave biases undecayed;
      ``create_optimizer``'s no-decay group sets it to 0 for you) and the lr
      :math:`\mathrm{lr}_t \cdot \mathrm{lr\_1d} / \mathrm{lr}`, where :math:`\mathrm{lr}_t` is
      the group's current lr and :math:`\mathrm{lr}` the constructor's: ``lr_1d`` is the 1-D
      lr at the constructor's lr, and an lr schedule, or a group's own lr, scales it alike.
      The constructor's lr must then not be 0 (ValueError);
    - timm: with the group's ``betas``, ``weight_decay`` and lr (``lr_1d``, ``betas_1d``,
      ``weight_decay_1d`` are not used).

    ``weight_decay_mode``: the decay above is ``"decoupled"`` (the default, the references');
    ``"coupled"`` adds :math:`\lambda \theta` to :math:`g_t` and ``"absolute"`` multiplies
    :math:`\theta` by :math:`1 - \lambda`, with the same :math:`\lambda` per tensor kind.
    ``maximize`` negates :math:`g_t` before anything else.

    Where this differs from the official code: every hyperparameter may be set per param group
    (the official code reads ``eps``, ``gamma``, ``optimize_1d`` and the 1-D ones from its
    constructor only; the two agree where groups do not set those); the gradient memory
    :math:`g_{t-1}` is a copy (the official code keeps a reference to ``p.grad``, the same
    where gradients are set to None between steps, torch's default, but with
    ``zero_grad(set_to_none=False)`` its difference is always zero). Not implemented:
    ``mars_type="mars-lion"`` / ``"mars-shampoo"`` and the exact gradient difference
    (``is_approx=False``), both refused with a ValueError; ``mars_type`` and ``is_approx`` are
    accepted so that the official call signature works unchanged.

    The clip needs a per-tensor norm, so there is no generated fused path (``fused=True`` is
    refused). State: ``step``, ``exp_avg`` (m), ``exp_avg_sq`` (v), ``last_grad``
    (:math:`g_{t-1}`), ``max_exp_avg_sq`` (amsgrad).
    """

    no_fused_reason = "it clips the variance-reduced gradient of each matrix by that matrix's norm"
    constraints = dict(betas=beta_tuple(2), eps=non_negative, amsgrad=boolean, gamma=non_negative,
                       is_approx=boolean, mars_type=one_of("mars-adamw"), optimize_1d=boolean,
                       lr_1d=non_negative, betas_1d=beta_tuple(2), weight_decay_1d=non_negative,
                       variant=one_of(*VARIANTS))
    state_names = ("exp_avg", "exp_avg_sq", "last_grad")
    supports_complex = False
    shard_reductions = True      # the clip's norm is TensorList.norm: over every shard of a DTensor

    def __init__(self, params: ParamsT, lr: float = 3e-3, betas: tuple[float, float] = (0.95, 0.99),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, gamma: float = 0.025,
                 is_approx: bool = True, mars_type: str = "mars-adamw", optimize_1d: bool = False,
                 lr_1d: float = 3e-3, betas_1d: tuple[float, float] = (0.9, 0.95),
                 weight_decay_1d: float = 0.1, *, variant: str = "official",
                 weight_decay_mode: str = "decoupled", maximize: bool = False, fused: bool = False) -> None:
        super().__init__(params, dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, gamma=gamma,
            is_approx=is_approx, mars_type=mars_type, optimize_1d=optimize_1d, lr_1d=lr_1d,
            betas_1d=betas_1d, weight_decay_1d=weight_decay_1d, variant=variant,
            weight_decay_mode=weight_decay_mode, maximize=maximize, fused=fused))

    def check_group(self, group: dict[str, Any]) -> None:
        if group["is_approx"] is not True:
            raise ValueError(f"invalid is_approx={group['is_approx']!r}: only the approximate gradient "
                             "difference (is_approx=True, the default) is implemented; the exact one "
                             "needs a second gradient per step")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        lr = self.defaults["lr"]
        adamw = [p for p in group["params"] if not self._is_matrix(group, p)]
        if group["variant"] == "official" and adamw and float(lr) == 0:
            self.param_groups.pop()
            raise ValueError(
                f"invalid lr={lr!r} for MARS with a tensor of shape {tuple(adamw[0].shape)}: such tensors "
                "get AdamW with lr_1d scaled by (the group's lr) / lr, which lr=0 leaves undefined. Pass "
                "the peak lr to the constructor (a schedule sets the groups' lr), or use optimize_1d=True "
                "or variant='timm'")

    def state_names_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        return self.state_names + (("max_exp_avg_sq",) if group["amsgrad"] else ())

    @staticmethod
    def _is_matrix(group: dict[str, Any], p: Tensor) -> bool:
        if group["optimize_1d"]:
            return True
        return p.dim() == 2 if group["variant"] == "official" else p.dim() >= 2

    def _kinds(self, group: dict[str, Any], matrix: list[bool]) -> Iterator[Kind]:
        """The matrices' (indices, betas, lr, weight decay), then the AdamW tensors'."""
        lr = float(group["lr"])
        for kind in (True, False):
            idx = [i for i, m in enumerate(matrix) if m is kind]
            if not idx:
                continue
            if kind or group["variant"] == "timm":
                yield idx, group["betas"], lr, group["weight_decay"]
            else:
                yield (idx, group["betas_1d"], lr * group["lr_1d"] / float(self.defaults["lr"]),
                       group["weight_decay_1d"])

    def prepare(self, group: dict[str, Any], b: Bucket) -> Work:
        # the base, without its decay: each tensor kind decays with its own lr and lambda
        w = super().prepare({**group, "weight_decay": 0.0}, b)
        g = TensorList(w.g)
        for idx, _, lr, wd in self._kinds(group, [self._is_matrix(group, x) for x in w.p]):
            decayed = apply_weight_decay(group["weight_decay_mode"], wd, _pick(w.p, idx), _pick(g, idx), lr,
                                         grads_owned=False)
            for i, x in zip(idx, decayed):
                g[i] = x
        return w._replace(g=g)

    def update(self, group, p, g, s, t):
        matrix = [self._is_matrix(group, x) for x in p]
        c = self._corrected(group, g, s["last_grad"], matrix, t)
        for idx, betas, lr, _ in self._kinds(group, matrix):
            self._adam(group, betas, lr, _pick(p, idx), _pick(c, idx),
                       {n: _pick(x, idx) for n, x in s.items()}, [t[i] for i in idx])

    @staticmethod
    def _corrected(group, g, last, matrix, t):
        """A new list: the clipped c_t for matrices, g_t for the others; last_grad <- g_t."""
        b1 = group["betas"][0]
        k = group["gamma"] * (b1 / (1 - b1))
        official = group["variant"] == "official"
        c = g.sub(last)                                            # g_t - g_{t-1}
        # official: g_0 = 0 (last_grad starts at zero); timm: no difference on step 1
        c.mul_([k if m and (official or n > 1) else 0.0 for m, n in zip(matrix, t)]).add_(g)  # c_t
        last.copy_(g)                                              # g_{t-1} <- g_t
        clipped = c.select(matrix)
        if clipped:
            norms = clipped.norm()
            torch._foreach_clamp_min_(norms, 1.0)
            clipped.div_(norms)                                    # c_t / max(1, ||c_t||)
        return c

    @staticmethod
    def _adam(group, betas, lr, p, c, s, t):
        """The AdamW step on ``c`` (whose memory it reuses for the denominator)."""
        (b1, b2), eps = betas, group["eps"]
        m, v = s["exp_avg"], s["exp_avg_sq"]
        m.lerp_(c, 1 - b1)                                         # m_t = b1 m + (1 - b1) c_t
        v.mul_(b2).addcmul_(c, c, value=1 - b2)                    # v_t = b2 v + (1 - b2) c_t^2
        if group["amsgrad"]:
            v = s["max_exp_avg_sq"].maximum_(v)                    # max(v_t, its previous max)
        # lr/(1-b1^t) m/(sqrt(v)/c2 + eps) = lr c2/(1-b1^t) m/(sqrt(v) + eps c2), c2 = sqrt(1-b2^t)
        c2 = [math.sqrt(1 - b2**n) for n in t]
        denom = c.copy_(v).sqrt_().add_([eps * x for x in c2])
        p.addcdiv_(m, denom, [-lr * x / (1 - b1**n) for x, n in zip(c2, t)])


def _no_decay_groups_skip_1d_decay(model: Any, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``create_optimizer``'s no-decay group (biases, norms) gets no ``weight_decay_1d`` either:
    without this, the tensors it exempts from decay would decay by the 1-D rate."""
    return [{**g, "weight_decay_1d": 0.0} if g.get("weight_decay") == 0.0 and "weight_decay_1d" not in g
            else g for g in groups]


register(MARS, "MARS-AdamW: variance-reduced gradients in AdamW (Yuan et al., 2024)", elementwise=False,
         prepare_groups=_no_decay_groups_skip_1d_decay)
