"""SparseAdam (torch.optim semantics): Adam on the rows a sparse gradient touches."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from ..base import Optimizer, ParamsT, Work
from ..constraints import beta_tuple, positive, tensor_or
from ..distributed import is_dtensor
from ..precision import float32_copies
from ..registry import register


class SparseAdam(Optimizer):
    r"""Adam restricted to the entries a sparse gradient holds, as ``torch.optim.SparseAdam``
    computes it. For every index :math:`i` stored in the (coalesced) gradient:

    .. math::
        m_i &\leftarrow m_i + (1 - \beta_1)(g_i - m_i), \qquad
        v_i \leftarrow v_i + (1 - \beta_2)(g_i^2 - v_i) \\
        \theta_i &\leftarrow \theta_i - \mathrm{lr}\,\frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}
                  \cdot \frac{m_i}{\sqrt{v_i} + \epsilon}

    Entries the gradient does not hold keep their parameter and moments unchanged; ``t``
    counts the steps the parameter had a gradient (empty ones included). Made for
    ``nn.Embedding(sparse=True)``: dense gradients are refused (use :class:`Adam`), as are
    sparse or complex parameters. No weight decay. State: ``step`` (an int, as torch's),
    ``exp_avg`` (m), ``exp_avg_sq`` (v), dense like the parameter.

    torch's signature; no ``fused`` or ``foreach`` (torch has neither): the update indexes
    rows, which a fused elementwise kernel cannot express.
    """

    constraints = dict(lr=tensor_or(positive), betas=beta_tuple(2), eps=positive)
    state_names = ("exp_avg", "exp_avg_sq")
    supports_sparse = True
    supports_complex = False

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 maximize: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, maximize=maximize))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group.get("params") if isinstance(param_group, dict) else None
        if params is not None:
            params = [params] if isinstance(params, Tensor) else list(params)
            param_group = {**param_group, "params": params}
            tensors = [p[1] if isinstance(p, tuple) else p for p in params]   # named params too
            for refused, what in ((lambda p: p.is_sparse, "Sparse params at indices {}: SparseAdam "
                                   "requires dense parameter tensors"),
                                  (lambda p: p.is_complex(), "Complex params at indices {}: SparseAdam does "
                                   "not support complex parameters")):
                hits = [i for i, p in enumerate(tensors) if isinstance(p, Tensor) and refused(p)]
                if hits:
                    raise ValueError(what.format(hits))
        super().add_param_group(param_group)

    def _check_tensor_subclass(self, group: dict[str, Any], param: Tensor) -> None:
        if is_dtensor(param):
            raise ValueError("SparseAdam does not support DTensor parameters (FSDP2, tensor parallel): it "
                             "steps on sparse gradients (nn.Embedding(sparse=True)), which FSDP2 and tensor "
                             "parallelism do not produce (their gradients are dense DTensors); use Adam")
        super()._check_tensor_subclass(group, param)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for st in self.state.values():        # the base loads step counts as tensors
            if "step" in st:
                st["step"] = int(st["step"])

    def _entries(self, group: dict[str, Any]) -> dict[tuple, list]:
        # Refused with every other check of the step, before any group changes.
        by_key = super()._entries(group)
        for entries in by_key.values():
            if any(not grad.is_sparse for _, grad, _ in entries):
                raise RuntimeError("SparseAdam does not support dense gradients, please consider "
                                   "Adam instead")
        return by_key

    def step_group(self, group: dict[str, Any], buckets: list) -> None:
        for b in buckets:
            p, g, s = float32_copies(group, b) if b.low_precision else (b.p, b.g, b.s)
            # torch's SparseAdam counts steps with a Python int and computes its step size
            # from it: kept so, a state dict resumes in torch with the same float64 numbers
            t = []
            for st in b.states:
                st["step"] = int(st["step"]) + 1
                t.append(st["step"])
            for i in range(len(p)):
                self._update_rows(group, p[i], g[i], s["exp_avg"][i], s["exp_avg_sq"][i], t[i])
            self.finish(group, Work(b, p, g, s, t))

    @staticmethod
    def _update_rows(group: dict[str, Any], p: Tensor, g: Tensor, m: Tensor, v: Tensor,
                     t: float) -> None:
        g = g.coalesce()                      # repeated indices sum first: the update is not linear
        values = g._values()
        if values.numel() == 0:
            return
        if group["maximize"]:
            values = -values
        rows = tuple(g._indices())            # one index tensor per sparse dimension
        b1, b2 = group["betas"]
        m_new = m[rows].lerp_(values, 1 - b1)
        v_new = v[rows]
        v_new.add_(values.square().sub_(v_new), alpha=1 - b2)
        m.index_put_(rows, m_new)
        v.index_put_(rows, v_new)
        step_size = group["lr"] * math.sqrt(1 - b2**t) / (1 - b1**t)
        p.index_put_(rows, p[rows].sub_(m_new.div(v_new.sqrt().add_(group["eps"])).mul_(step_size)))


register(SparseAdam, "Adam on the rows a sparse gradient touches (torch.optim semantics; "
         "nn.Embedding(sparse=True))", name="sparse_adam", aliases=("sparseadam",), elementwise=False)
