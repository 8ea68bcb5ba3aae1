"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..base import Optimizer, ParamsT
from ..constraints import beta_tuple, boolean, integer_at_least, non_negative, unit_interval
from ..precision import LOW_PRECISION
from ..registry import register

__all__ = ["SOAP"]

Layout = tuple[list[int], list[bool]]     # the shape preconditioned, and which of its dims are


def merged_shape(shape: list[int], max_precond_dim: int) -> list[int]:
    """The reference's ``merge_dims``: neighbouring dims multiplied together while the product
    stays <= ``max_precond_dim`` (a (64, 32, 3, 3) kernel -> (64, 288))."""
    out, run = [], 1
    for d in shape:
        if run * d > max_precond_dim:
            if run > 1:
                out.append(run)
                run = d
            else:
                out.append(d)
                run = 1
        else:
            run *= d
    if run > 1 or not out:
        out.append(run)
    return out


def _matrices(flat: Tensor, layout: Layout) -> list[Tensor | None]:
    """Views of one state tensor as the (d, d) matrix of each preconditioned dim (None: not)."""
    out, at = [], 0
    for d, on in zip(*layout):
        out.append(flat[at:at + d * d].view(d, d) if on else None)
        at += d * d if on else 0
    return out


def _project(x: Tensor, qs: list[Tensor | None], layout: Layout, back: bool = False) -> Tensor:
    """:math:`x \\times_1 Q_1^\\top \\cdots \\times_k Q_k^\\top` (``back``: :math:`Q_i`), in
    ``x``'s shape: each step contracts the leading dim and appends the result as the last.
    Always a new tensor (the callers update it in place)."""
    if all(q is None for q in qs):
        return x.clone()
    y = x.reshape(layout[0])
    for q in qs:
        y = (y.permute(*range(1, y.dim()), 0) if q is None
             else torch.tensordot(y, q, dims=([0], [1 if back else 0])))
    return y.reshape(x.shape)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in LOW_PRECISION else x.dtype


def _eigenbasis(gram: Tensor) -> Tensor:
    """Eigenvectors of a symmetric matrix, by decreasing eigenvalue (eigh; float64 if it fails)."""
    m = gram.to(_compute_dtype(gram))
    eye = torch.eye(len(m), dtype=m.dtype, device=m.device)
    try:
        q = torch.linalg.eigh(m + 1e-30 * eye)[1]
    except RuntimeError:
        q = torch.linalg.eigh(m.double() + 1e-30 * eye.double())[1]
    return q.flip(1)


class SOAP(Optimizer):
    r"""SOAP (Vyas et al., 2024, "SOAP: Improving and Stabilizing Shampoo using Adam",
    Algorithm 3; defaults of the authors' code, nikhilvyas/SOAP).

    For a matrix gradient :math:`G_t` (a tensor: one factor per dim, the same way), with
    Shampoo's factors :math:`L, R` and their eigenbases :math:`Q_L, Q_R`:

    .. math::
        G'_t &= Q_L^\top G_t Q_R, \qquad
        M_t = \beta_1 M_{t-1} + (1 - \beta_1) G_t, \qquad M'_t = Q_L^\top M_t Q_R \\
        V_t &= \beta_2 V_{t-1} + (1 - \beta_2) G'_t \odot G'_t \\
        W_t &= W_{t-1} - \mathrm{lr}\, \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}\,
            Q_L \frac{M'_t}{\sqrt{V_t} + \epsilon} Q_R^\top, \qquad
            W_t \leftarrow (1 - \mathrm{lr}\,\lambda) W_t \\
        L_t &= \beta_s L_{t-1} + (1 - \beta_s) G_t G_t^\top, \qquad
        R_t = \beta_s R_{t-1} + (1 - \beta_s) G_t^\top G_t

    with :math:`\beta_s` = ``shampoo_beta``. Every ``precondition_frequency`` steps each
    :math:`Q` is refreshed by one power iteration, :math:`Q \leftarrow \mathrm{QR}(L Q)`, its
    columns first sorted by the estimated eigenvalues :math:`\mathrm{diag}(Q^\top L Q)` (and
    :math:`V`'s entries with them). The first step only accumulates :math:`L, R` and sets
    :math:`Q` by ``eigh`` (the current gradient never enters its own projection); :math:`t`
    above counts the steps after it. Dims larger than ``max_precond_dim`` are not rotated;
    ``merge_dims`` first merges neighbouring dims while their product is <= it; 1-D params
    are plain Adam unless ``precondition_1d``; ``normalize_grads`` divides the update by its
    RMS; ``correct_bias=False`` drops the bias corrections.

    Weight decay: ``"decoupled"`` (the default) multiplies by :math:`1 - \mathrm{lr}\,\lambda`
    after the update, as the reference; ``"coupled"`` / ``"absolute"`` as the base class.
    Eigen- and QR decompositions run in float32 for bf16/fp16 params (as the reference), in
    the param's dtype otherwise (the reference's QR is always float32). ``shampoo_beta`` is a
    number, default 0.95 = the default :math:`\beta_2` (the reference's -1 means "beta2").
    State: ``step``, ``exp_avg`` (M), ``exp_avg_sq`` (V, in the eigenbasis), ``GG`` (the
    factors L, R, ... flattened into one tensor), ``Q`` (their eigenbases, the same way).
    Eager only (per-tensor decompositions); ``fused=True`` is refused.
    """

    constraints = dict(betas=beta_tuple(2), shampoo_beta=unit_interval, eps=non_negative,
                       precondition_frequency=integer_at_least(1), max_precond_dim=integer_at_least(1),
                       merge_dims=boolean, precondition_1d=boolean, normalize_grads=boolean,
                       correct_bias=boolean)
    state_names = ("exp_avg", "exp_avg_sq", "GG", "Q")
    supports_complex = False

    def __init__(self, params: ParamsT, lr: float = 3e-3, betas: tuple[float, float] = (0.95, 0.95),
                 shampoo_beta: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.01,
                 precondition_frequency: int = 10, max_precond_dim: int = 10000, merge_dims: bool = False,
                 precondition_1d: bool = False, normalize_grads: bool = False, correct_bias: bool = True, *,
                 weight_decay_mode: str = "decoupled", maximize: bool = False, fused: bool = False) -> None:
        super().__init__(params, dict(
            lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps, weight_decay=weight_decay,
            precondition_frequency=precondition_frequency, max_precond_dim=max_precond_dim,
            merge_dims=merge_dims, precondition_1d=precondition_1d, normalize_grads=normalize_grads,
            correct_bias=correct_bias, weight_decay_mode=weight_decay_mode, maximize=maximize, fused=fused))

    @staticmethod
    def layout(group: dict[str, Any], p: Tensor) -> Layout:
        """The shape a param is preconditioned in, and which of its dims get a factor."""
        shape, top = list(p.shape), group["max_precond_dim"]
        if p.dim() <= 1:
            return shape, [group["precondition_1d"] and d <= top for d in shape]
        if group["merge_dims"]:
            shape = merged_shape(shape, top)
        return shape, [d <= top for d in shape]

    def _factor_size(self, group: dict[str, Any], p: Tensor) -> int:
        shape, on = self.layout(group, p)
        return sum(d * d for d, o in zip(shape, on) if o)

    def init_state(self, group: dict[str, Any], p: Tensor, name: str) -> Tensor:
        if name in ("GG", "Q") and p.numel():
            return p.new_zeros(self._factor_size(group, p))
        return torch.zeros_like(p, memory_format=torch.preserve_format)

    def state_shape(self, group: dict[str, Any], p: Tensor, name: str) -> tuple[int, ...]:
        if name in ("GG", "Q") and p.numel():
            return (self._factor_size(group, p),)
        return tuple(p.shape)

    def decay_lr(self, group: dict[str, Any], t: list[float]) -> float:
        return 0.0    # "decoupled": applied after the update (update()); the base's is a no-op

    def update(self, group, p, g, s, t):
        for x, grad, m, v, gg, q, k in zip(p, g, s["exp_avg"], s["exp_avg_sq"], s["GG"], s["Q"], t):
            if x.numel() == 0:
                continue
            layout = self.layout(group, x)
            if gg.numel() != sum(d * d for d, on in zip(*layout) if on):
                raise ValueError(f"SOAP: the preconditioner state of a parameter of shape {tuple(x.shape)} "
                                 "does not fit max_precond_dim / merge_dims / precondition_1d: they cannot "
                                 "change after the first step")
            factors, bases = _matrices(gg, layout), _matrices(q, layout)
            if k > 1:
                self._adam_in_eigenbasis(group, x, grad, m, v, bases, layout, int(k) - 1)
            self._accumulate(grad.reshape(layout[0]), factors, group["shampoo_beta"])
            if k == 1:
                for f, b in zip(factors, bases):
                    if f is not None:
                        b.copy_(_eigenbasis(f))                        # Q from eigh, once
            elif (int(k) - 1) % group["precondition_frequency"] == 0:
                self._refresh(factors, bases, v, layout)

    @staticmethod
    def _adam_in_eigenbasis(group, x, grad, m, v, bases, layout, n):
        (b1, b2), eps, lr = group["betas"], group["eps"], float(group["lr"])
        m.lerp_(grad, 1 - b1)                                         # M_t = b1 M + (1 - b1) G
        v.lerp_(_project(grad, bases, layout).square_(), 1 - b2)      # V_t = b2 V + (1 - b2) G'^2
        direction = _project(m, bases, layout).div_(v.sqrt().add_(eps))   # M' / (sqrt(V) + eps)
        direction = _project(direction, bases, layout, back=True)     # back to the parameter's basis
        if group["normalize_grads"]:
            direction.div_(direction.square().mean().sqrt().add_(1e-30))
        step = lr * math.sqrt(1 - b2**n) / (1 - b1**n) if group["correct_bias"] else lr
        x.add_(direction, alpha=-step)
        if group["weight_decay_mode"] == "decoupled" and group["weight_decay"]:
            x.mul_(1 - lr * group["weight_decay"])                    # W <- (1 - lr wd) W, after

    @staticmethod
    def _accumulate(grad, factors, beta):
        others = lambda i: [j for j in range(grad.dim()) if j != i]   # noqa: E731
        for i, f in enumerate(factors):
            if f is not None:                                         # L_i = b L_i + (1 - b) G_(i) G_(i)^T
                f.lerp_(torch.tensordot(grad, grad, dims=(others(i), others(i))), 1 - beta)

    @staticmethod
    def _refresh(factors, bases, v, layout):
        """One power iteration per factor: Q <- QR(L Q), columns by decreasing eigenvalue."""
        v_rot = v.reshape(layout[0])
        for i, (f, b) in enumerate(zip(factors, bases)):
            if f is None:
                continue
            lq = f @ b
            order = torch.argsort((b * lq).sum(0), descending=True)  # diag(Q^T L Q), largest first
            v_rot = v_rot.index_select(i, order)                      # V follows its columns
            b.copy_(torch.linalg.qr(lq.index_select(1, order).to(_compute_dtype(lq)))[0])
        v.copy_(v_rot.reshape(v.shape))


register(SOAP, "SOAP: Adam in the eigenbasis of Shampoo's preconditioner (Vyas et al., 2024)",
         elementwise=False)
