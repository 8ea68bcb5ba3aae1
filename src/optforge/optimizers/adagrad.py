"""Adagrad (torch.optim semantics), sparse gradients included."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..base import Optimizer, ParamsT
from ..constraints import non_negative
from ..registry import register


class Adagrad(Optimizer):
    r"""Adagrad (Duchi et al., 2011), as ``torch.optim.Adagrad`` computes it:

    .. math::
        \mathrm{clr}_t &= \frac{\mathrm{lr}}{1 + (t - 1)\, \eta} \\
        s_t &= s_{t-1} + g_t^2, \qquad s_0 = \text{initial\_accumulator\_value} \\
        \theta_t &= \theta_{t-1} - \mathrm{clr}_t \frac{g_t}{\sqrt{s_t} + \epsilon}

    with :math:`\eta` the ``lr_decay``. Weight decay is coupled L2 by default. State:
    ``step``, ``sum`` (s).

    Sparse gradients (``nn.Embedding(sparse=True)``) update only the rows they hold, as torch
    does (their ``sum`` entries, then the parameter's). Unlike torch, which refuses weight
    decay with a sparse gradient, coupled decay makes such a gradient dense (the dense update
    then runs), as :class:`SGD` does. torch creates the state at construction, optforge at
    the first step (the same values).

    torch's signature (``foreach``, ``differentiable``, ``fused``: see
    :mod:`optforge.torch_compat`). By default (``fused=None``) float32/float64 steps with coupled
    (or no) weight decay run torch's fused Adagrad kernel, the same update in one pass
    (:mod:`optforge.paths`); ``fused=False`` forces the foreach path.
    """

    constraints = dict(lr_decay=non_negative, initial_accumulator_value=non_negative, eps=non_negative)
    state_names = ("sum",)
    state_kinds = dict(sum="non_negative")
    supports_sparse = True

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-2, lr_decay: float = 0.0,
                 weight_decay: float = 0.0, initial_accumulator_value: float = 0.0, eps: float = 1e-10,
                 foreach: bool | None = None, *, maximize: bool = False, differentiable: bool = False,
                 fused: bool | None = None, weight_decay_mode: str = "coupled") -> None:
        super().__init__(params, dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value, eps=eps,
                                      foreach=foreach, maximize=maximize, differentiable=differentiable,
                                      fused=fused, weight_decay_mode=weight_decay_mode))

    def init_state(self, group: dict[str, Any], p: Tensor, name: str) -> Tensor:
        value = group["initial_accumulator_value"]
        return torch.full_like(p, complex(value, value) if p.is_complex() else value,
                               memory_format=torch.preserve_format)

    def state_shape(self, group: dict[str, Any], p: Tensor, name: str) -> tuple[int, ...]:
        return tuple(p.shape)

    def scalars(self, group: dict[str, Any], t: float) -> dict[str, float]:
        return dict(step=-group["lr"] / (1 + (t - 1) * group["lr_decay"]))

    def update(self, group, p, g, s, t) -> None:
        sparse = [x.is_sparse for x in g]
        if not any(sparse):
            super().update(group, p, g, s, t)
            return
        for pi, gi, si, ti, is_sparse in zip(p, g, s["sum"], t, sparse):
            if is_sparse:
                self._sparse_update(group, pi, gi, si, self.scalars(group, ti)["step"])
        dense = [not x for x in sparse]
        if any(dense):
            super().update(group, p.select(dense), g.select(dense),
                           {k: v.select(dense) for k, v in s.items()}, [x for x, d in zip(t, dense) if d])

    @staticmethod
    def _sparse_update(group, p: Tensor, g: Tensor, s: Tensor, step: float) -> None:
        """Only the rows ``g`` holds: s += g^2 there, theta -= clr g / (sqrt(s) + eps) there."""
        g = g.coalesce()      # the update is not linear in g: each index once
        indices, values = g._indices(), g._values()
        s.add_(torch.sparse_coo_tensor(indices, values.pow(2), g.size()))
        std = s.sparse_mask(g)._values().sqrt_().add_(group["eps"])
        p.add_(torch.sparse_coo_tensor(indices, values / std, g.size()), alpha=step)

    @staticmethod
    def kernel(group, p, g, s, c):
        acc = s["sum"].addcmul_(g, g, value=1)                     # s_t = s + g^2
        p.addcdiv_(g, acc.sqrt().add_(group["eps"]), c["step"])   # theta -= clr g / (sqrt(s_t) + eps)

    def native_fused(self, group: dict[str, Any]) -> bool:
        # torch's fused Adagrad decays the gradient (coupled L2) only
        return group["weight_decay_mode"] == "coupled" or group["weight_decay"] == 0

    def fused_update(self, group, p, g, s, steps, grad_scale=None, found_inf=None):
        torch._fused_adagrad_(p, g, s["sum"], steps, lr=group["lr"], lr_decay=group["lr_decay"],
                              weight_decay=group["weight_decay"] if group["weight_decay_mode"] == "coupled"
                              else 0.0, eps=group["eps"], maximize=group["maximize"],
                              grad_scale=grad_scale, found_inf=found_inf)


register(Adagrad, "Adagrad (Duchi et al., 2011); lr_decay, initial accumulator, sparse gradients")
