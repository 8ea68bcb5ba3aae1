"""NorMuon: Muon's orthogonalized update, normalized row by row with a second moment."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..base import Optimizer, ParamsT
from ..constraints import unit_interval
from ..distributed import local
from ..distributed_matrix import map_matrices
from ..registry import register
from .muon import NS_COEFFICIENTS, NS_DTYPES, Muon, _lr_ratio, muon_param_groups, orthogonalize

__all__ = ["NorMuon"]

ROW_EPS = 1e-10    # the authors' guard in the row normalization and in the norm ratio


class NorMuon(Muon):
    r"""NorMuon (Li et al., 2025, "NorMuon: Making Muon more efficient and scalable",
    arXiv:2510.05491): Muon whose orthogonalized update is divided, row by row, by the root
    of a second-moment estimate of that row, then rescaled to its norm before the division,
    as the authors' ``SingleDeviceNorMuon`` (github.com/zichongli5/NorMuon).

    For a hidden-layer matrix :math:`W` of shape :math:`A \times B` (conv kernels viewed as
    (out, in * kernel size)), with :math:`\mu` = ``momentum``, :math:`\beta_2` = ``beta2``:

    .. math::
        B_t &= \mu B_{t-1} + (1 - \mu) g_t, \qquad
        U_t = \begin{cases} (1 - \mu) g_t + \mu B_t & \text{nesterov} \\ B_t & \text{else} \end{cases} \\
        O_t &= \mathrm{NS}_{k}^{(a,b,c)}(U_t), \quad
            X_0 = U_t / (\lVert U_t \rVert_F + \epsilon) \quad (\text{see } :func:`orthogonalize`) \\
        v_t &= \beta_2 v_{t-1} + (1 - \beta_2) \tfrac{1}{B} \textstyle\sum_j (O_t)_{ij}^2
            \qquad \text{(one entry per row } i) \\
        \hat O_t &= O_t / (\sqrt{v_t} + 10^{-10}) \quad \text{(row } i \text{ by } v_{t,i}), \qquad
        \tilde O_t = \hat O_t\, \lVert O_t \rVert_F / (\lVert \hat O_t \rVert_F + 10^{-10}) \\
        W_t &= W_{t-1}(1 - \mathrm{lr}\,\lambda) - \mathrm{lr}\,\rho(A, B)\, \tilde O_t

    with :math:`\rho = \sqrt{\max(1, A/B)}` (or Muon's ``adjust_lr_fn="match_rms_adamw"``);
    :math:`v` has no bias correction (as the authors'). The normalization runs in float32, or
    in the parameter's dtype where that is wider.

    Everything else is :class:`Muon`'s: the ``use_muon`` param-group key routes params to an
    AdamW fallback (betas ``adamw_betas``, ``adamw_eps``, as the authors'
    ``SingleDeviceNorMuonWithAuxAdam``), ``create_optimizer(model, "normuon")`` splits a
    model with :func:`muon_param_groups`, and ``ns_dtype`` picks the Newton-Schulz dtype
    (``"bfloat16"`` by default, as the authors'; ``"param"`` for exact float64 runs). The
    defaults are the authors' (lr 0.02, no weight decay, momentum and beta2 0.95, Nesterov).
    Differences: conv kernels and other tensors with more than 2 dims are normalized as their
    (out, -1) matrix (the authors' code normalizes their last two dims); params without a
    gradient are skipped (the authors' code steps them with a zero gradient).

    State: ``step``; ``momentum_buffer`` (like the param) and ``second_momentum_buffer``
    (:math:`A \times 1`; like the param when it is empty) for NorMuon's params; ``exp_avg``,
    ``exp_avg_sq`` for the fallback's (as in :class:`Muon`, a param's unused entries are
    empty tensors). In float32 that is :math:`4 + 4/B` bytes per matrix entry (Muon's 4 and
    one number per row), AdamW's 8 for the fallback's params. Eager only; ``fused=True`` is
    refused. Under FSDP2 / tensor parallel (DTensor params) the momentum is sharded like the
    params and each matrix is orthogonalized and normalized by one owner rank, which keeps its
    ``second_momentum_buffer`` (:mod:`optforge.distributed_matrix`, docs/distributed.md).
    """

    no_fused_reason = "it orthogonalizes the update of each whole matrix and normalizes its rows"
    constraints = {**Muon.constraints, "beta2": unit_interval}
    matrix_state = ("momentum_buffer", "second_momentum_buffer")
    owner_state = ("second_momentum_buffer",)      # one number per row: kept by each matrix's owner
    stacks_across_tensors = False                  # one matrix at a time

    def __init__(self, params: ParamsT, lr: float | Tensor = 0.02, weight_decay: float = 0.0,
                 momentum: float = 0.95, beta2: float = 0.95, nesterov: bool = True,
                 ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS, eps: float = 1e-7,
                 ns_steps: int = 5, adjust_lr_fn: str | None = None, *, ns_dtype: str = "bfloat16",
                 adamw_betas: tuple[float, float] = (0.9, 0.95), adamw_eps: float = 1e-10,
                 weight_decay_mode: str = "decoupled", maximize: bool = False, fused: bool = False) -> None:
        Optimizer.__init__(self, params, dict(
            lr=lr, momentum=momentum, beta2=beta2, nesterov=nesterov, weight_decay=weight_decay,
            ns_coefficients=ns_coefficients, ns_steps=ns_steps, eps=eps, adjust_lr_fn=adjust_lr_fn,
            ns_dtype=ns_dtype, use_muon=None, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
            weight_decay_mode=weight_decay_mode, maximize=maximize, fused=fused))

    def init_state(self, group: dict[str, Any], p: Tensor, name: str) -> Tensor:
        if name == "second_momentum_buffer" and self._is_muon(group, p) and p.numel():
            return p.new_zeros(p.shape[0], 1)
        return super().init_state(group, p, name)

    def state_shape(self, group: dict[str, Any], p: Tensor, name: str) -> tuple[int, ...]:
        if name == "second_momentum_buffer" and self._is_muon(group, p) and p.numel():
            return (p.shape[0], 1)
        return super().state_shape(group, p, name)

    def _muon(self, group, lr, decay, params, grads, state):
        mu, beta2, dtype = group["momentum"], group["beta2"], NS_DTYPES[group["ns_dtype"]]
        inputs = []
        for g, buf in zip(grads, state["momentum_buffer"]):   # elementwise: local shards under FSDP2
            buf.lerp_(g, 1 - mu)                                   # B_t = mu B + (1 - mu) g
            inputs.append(g.lerp(buf, mu) if group["nesterov"] else buf)   # U_t = (1 - mu) g + mu B_t
        rows = state.get("second_momentum_buffer")             # absent under FSDP2: owner-held

        def normalized(u, sts):                      # one whole U_t (conv kernels flattened)
            v = sts[0]["second_momentum_buffer"]
            o = orthogonalize(u[0].flatten(1), group["ns_coefficients"], group["ns_steps"], group["eps"],
                              dtype, add_eps=True).to(torch.promote_types(u.dtype, torch.float32))
            norm = o.norm()
            v.lerp_(o.square().mean(dim=1, keepdim=True).to(v.dtype), 1 - beta2)   # v_t, one per row
            o.div_(v.to(o.dtype).sqrt().add_(ROW_EPS))                            # O_t / (sqrt(v_t) + eps)
            o.mul_(norm / o.norm().add_(ROW_EPS))                                  # back to the norm of O_t
            return o.reshape(u.shape)

        states = None if rows is None else [{"second_momentum_buffer": v} for v in rows]
        for p, o in zip(params, map_matrices(self, group, params, inputs, normalized, states=states,
                                             batch=False)):
            if decay != 1:
                local(p).mul_(decay)                                               # W (1 - lr wd)
            if o.numel():
                ratio = _lr_ratio(group["adjust_lr_fn"], p.shape[0], math.prod(p.shape[1:]))
                local(p).add_(o.to(p.dtype), alpha=-lr * ratio)                  # W_t = W - lr rho O~_t

# compare_lr: the authors' lr, 0.02 (also the default)
register(NorMuon, "NorMuon: Muon with its orthogonalized update normalized per row by a second moment "
         "(Li et al., 2025); AdamW for vectors and scalars", elementwise=False, compare_lr=0.02,
         prepare_groups=lambda model, groups: muon_param_groups(model, groups))
