"""CAME: Adafactor's factored second moment, with momentum scaled by a factored confidence."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..base import ParamsT
from ..constraints import beta_tuple, non_negative, positive
from ..distributed import is_dtensor, on_shards
from ..registry import register
from ..tensorlist import TensorList
from .adafactor import FactoredOptimizer, dim_means, is_factored, mean_squares, rms_scale, unused_shape

__all__ = ["CAME"]


def factored_rsqrts(xs: list[Tensor], rows: list[Tensor], cols: list[Tensor]) -> list[Tensor]:
    """x / sqrt(R C / mean(R)) for row statistics R (shape (..., n)) and column statistics C
    (shape (..., m)) of each (..., n, m) tensor x: new tensors (a DTensor's: from the local
    shards of x, R and C, which line up; the means of R are one reduction for the list)."""
    def scaled(x: Tensor, row: Tensor, col: Tensor, row_mean: Tensor) -> Tensor:
        r = (row / row_mean).rsqrt_().unsqueeze(-1)
        return torch.mul(r, col.unsqueeze(-2).rsqrt()).mul_(x)
    means = dim_means(rows, -1)
    return [on_shards(scaled, x, x, row, col, mean) for x, row, col, mean in zip(xs, rows, cols, means)]


def same_shapes(xs: Sequence[Tensor]) -> list[list[int]]:
    """The positions of ``xs`` grouped by shape, in order; each DTensor alone (its local shard
    is what the ops see: shards of DTensors are not stacked)."""
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(xs):
        groups.setdefault((x.shape, id(x) if is_dtensor(x) else None), []).append(i)
    return list(groups.values())


def stacked(xs: Sequence[Tensor]) -> Tensor:
    """Tensors of one shape as one tensor along a new leading dim, so that every reduction over
    their last dims (and every op that broadcasts over them) runs once for all of them. A single
    tensor is a view (no copy); a DTensor is itself (it is alone: ``same_shapes``)."""
    if len(xs) > 1:
        return torch.stack(list(xs))
    return xs[0] if is_dtensor(xs[0]) else xs[0].unsqueeze(0)


def unstacked(x: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """The tensors of ``stacked(like)``-shaped ``x``, one per tensor of ``like`` (views)."""
    return [x] if is_dtensor(like[0]) else list(x.unbind(0))


class CAME(FactoredOptimizer):
    r"""CAME (Luo et al., 2023, "CAME: Confidence-guided Adaptive Memory Efficient
    Optimization", ACL, arXiv:2307.02047, Algorithm 1), as the authors' ``came-pytorch``
    0.1.3 (github.com/yangluo7/CAME) computes it.

    For a matrix (a tensor with more dims: each matrix of its last two dims), with
    :math:`d` = ``clip_threshold``, :math:`\epsilon_1` = ``eps``, :math:`\epsilon_2` = ``eps_instability``:

    .. math::
        r_t &= \beta_2 r_{t-1} + (1 - \beta_2)\, \mathrm{mean}_{cols}(G_t^2 + \epsilon_1), \qquad
        c_t = \beta_2 c_{t-1} + (1 - \beta_2)\, \mathrm{mean}_{rows}(G_t^2 + \epsilon_1) \\
        u_t &= G_t \big/ \sqrt{r_t c_t / \mathrm{mean}(r_t)}, \qquad
        \hat u_t = u_t / \max(1, \mathrm{RMS}(u_t) / d), \qquad
        m_t = \beta_1 m_{t-1} + (1 - \beta_1) \hat u_t \\
        U_t &= (\hat u_t - m_t)^2 + \epsilon_2 \quad \text{(instability)} \\
        R_t &= \beta_3 R_{t-1} + (1 - \beta_3)\, \mathrm{mean}_{cols}(U_t), \qquad
        C_t = \beta_3 C_{t-1} + (1 - \beta_3)\, \mathrm{mean}_{rows}(U_t) \\
        \theta_t &= \theta_{t-1} - \mathrm{lr}\; m_t \big/ \sqrt{R_t C_t / \mathrm{mean}(R_t)}

    A vector (or scalar) keeps :math:`v_t = \beta_2 v_{t-1} + (1 - \beta_2)(G_t^2 + \epsilon_1)` in
    full, :math:`u_t = G_t / \sqrt{v_t}`, and steps by :math:`\mathrm{lr}\, m_t` (the reference
    applies no confidence to vectors). No bias correction, as in the paper and the reference.

    Defaults are the reference's: ``betas=(0.9, 0.999, 0.9999)`` (:math:`\beta_1, \beta_2,
    \beta_3`, its order), ``eps=1e-30`` and ``eps_instability=1e-16`` (its ``eps=(eps1, eps2)``,
    two arguments here), ``clip_threshold=1.0``,
    ``weight_decay=0``. The reference has no default lr; 2e-4 is its README's example.
    Weight decay: the reference's is decoupled, :math:`\theta \leftarrow \theta (1 - \mathrm{lr}\,\lambda)`
    before the step: ``weight_decay_mode="decoupled"`` (the default, applied by the base class);
    ``"coupled"`` adds :math:`\lambda \theta` to :math:`G_t`, ``"absolute"`` multiplies
    :math:`\theta` by :math:`1 - \lambda`.

    State (the reference's names and shapes: ``came_pytorch.CAME`` loads these tensors): ``step``,
    ``exp_avg`` (m); a tensor with 2+ dims ``exp_avg_sq_row`` / ``exp_avg_res_row`` (r, R: shape
    ``(..., n)``) and ``exp_avg_sq_col`` / ``exp_avg_res_col`` (c, C: ``(..., m)``); anything else
    ``exp_avg_sq`` (v). The entries a tensor does not use are empty (0 elements).
    Eager only (per-tensor RMS and factored statistics): ``fused=True`` is refused. float16
    parameters need ``fp32_state`` (``configure``): :math:`\epsilon_1 = 10^{-30}` underflows in float16.
    """

    no_fused_reason = ("its second moment and confidence are factored into row and column means of each "
                       "matrix, which a per-element kernel cannot form")
    constraints = dict(betas=beta_tuple(3), eps=non_negative,
                       eps_instability=non_negative, clip_threshold=positive)
    state_names = ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_res_row", "exp_avg_res_col",
                   "exp_avg_sq")
    factors = dict(exp_avg_sq_row=(-1, False), exp_avg_sq_col=(-2, False),
                   exp_avg_res_row=(-1, False), exp_avg_res_col=(-2, False))

    def __init__(self, params: ParamsT, lr: float = 2e-4,
                 betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
                 eps: float = 1e-30, eps_instability: float = 1e-16,
                 clip_threshold: float = 1.0, weight_decay: float = 0.0, *,
                 weight_decay_mode: str = "decoupled", maximize: bool = False, fused: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps,
                                      eps_instability=eps_instability, clip_threshold=clip_threshold,
                                      weight_decay=weight_decay,
                                      weight_decay_mode=weight_decay_mode, maximize=maximize, fused=fused))

    def state_shape(self, group: dict[str, Any], p: Tensor, name: str) -> tuple[int, ...]:
        shape = tuple(p.shape)
        if name == "exp_avg":
            return shape
        if name == "exp_avg_sq":
            return unused_shape(p) if is_factored(p) else shape
        if not is_factored(p):
            return unused_shape(p)
        return shape[:-1] if name.endswith("_row") else (*shape[:-2], shape[-1])

    @staticmethod
    def _factored_ema(rows: list[TensorList], cols: list[TensorList], xs: list[Tensor], beta: float,
                      added: float) -> None:
        """rows[k], cols[k] <- beta (rows[k], cols[k]) + (1 - beta) (mean over columns, rows) of
        xs[k]^2 + added, for ``xs[k] = stacked(...)`` of the tensors whose statistics ``rows[k]``
        and ``cols[k]`` are (the means: one reduction for every k, one all-reduce per mesh dim
        for DTensors)."""
        means = mean_squares(xs + xs, [-1] * len(xs) + [-2] * len(xs), keepdim=False)
        for stats, mean in zip(rows + cols, means):
            stats.mul_(beta).add_(unstacked(mean.add_(added), stats), alpha=1 - beta)

    @staticmethod
    def _by_shape(xs: list[Tensor], groups: list[list[int]]) -> list[TensorList]:
        return [TensorList(xs[i] for i in idx) for idx in groups]

    def update(self, group, p, g, s, t):
        # Same-shape tensors are stacked, so each line below runs once per shape, not per tensor.
        (b1, b2, b3), eps = group["betas"], group["eps"]
        shapes = same_shapes(p)
        fac = [idx for idx in shapes if is_factored(p[idx[0]])]
        vec = [idx for idx in shapes if not is_factored(p[idx[0]])]
        u: list[Tensor | None] = [None] * len(p)
        rows, cols = (self._by_shape(s[n], fac) for n in ("exp_avg_sq_row", "exp_avg_sq_col"))
        grads = [stacked([g[i] for i in idx]) for idx in fac]
        self._factored_ema(rows, cols, grads, b2, added=eps)                          # r_t, c_t
        # u_t = G_t / sqrt(r_t c_t / mean(r_t)), each factored shape's stacked
        stacked_u = factored_rsqrts(grads, [stacked(r) for r in rows], [stacked(c) for c in cols])
        for idx, r, su in zip(fac, rows, stacked_u):
            for i, x in zip(idx, unstacked(su, r)):
                u[i] = x
        for idx in vec:
            v, gv = TensorList(s["exp_avg_sq"][i] for i in idx), TensorList(g[i] for i in idx)
            v.mul_(b2).add_(gv.mul(gv).add_(eps), alpha=1 - b2)        # v_t
            for i, x in zip(idx, unstacked(stacked(v).rsqrt().mul_(stacked(gv)), v)):
                u[i] = x                                              # u_t = G_t / sqrt(v_t)
        u = TensorList(u)
        clip = (torch.stack(u.norm()) / rms_scale(p)).div_(group["clip_threshold"]).clamp_(min=1.0)
        u.div_(list(clip.unbind()))                                   # u^_t = u_t / max(1, RMS(u_t)/d)
        m = s["exp_avg"]
        m.lerp_(u, 1 - b1)                                            # m_t = b1 m + (1 - b1) u^_t
        steps: list[Tensor] = list(m)                                 # vectors: no confidence
        if fac:
            # U_t = (u^_t - m_t)^2 + eps2, into u^_t's (spent) memory: stacked_u holds u^_t - m_t
            factored = [i for idx in fac for i in idx]
            TensorList(u[i] for i in factored).sub_(TensorList(m[i] for i in factored))
        rows, cols = (self._by_shape(s[n], fac) for n in ("exp_avg_res_row", "exp_avg_res_col"))
        self._factored_ema(rows, cols, stacked_u, b3, added=group["eps_instability"])   # R_t, C_t
        scaled = factored_rsqrts([stacked([m[i] for i in idx]) for idx in fac], [stacked(r) for r in rows],
                                 [stacked(c) for c in cols])
        for idx, r, sc in zip(fac, rows, scaled):
            for i, x in zip(idx, unstacked(sc, r)):
                steps[i] = x                                          # m_t / sqrt(S_t)
        p.add_(steps, alpha=-float(group["lr"]))                      # theta_t = theta - lr m_t / sqrt(S_t)


register(CAME, "CAME: Adafactor-style factored moments, confidence-scaled momentum (Luo et al., 2023)",
         elementwise=False)
