r"""SAM (Foret, Kleiner, Mobahi & Neyshabur, 2021) and its adaptive form ASAM (Kwon, Kim,
Park & Choi, 2021)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..constraints import boolean, non_negative, positive
from ..distributed import check_same_layout, local, reduction_key, sum_over_meshes
from .base import OptimizerWrapper

__all__ = ["SAM"]

CLOSURE_PATTERN = """\
    loss = loss_fn(model(x), y)          # the gradient at w
    loss.backward()

    def closure():                       # the loss and gradient at the perturbed weights
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    opt.zero_grad()"""


class SAM(OptimizerWrapper):
    r"""Sharpness-aware minimization around any optimizer: the base optimizer steps with the
    gradient taken at the worst point of a :math:`\rho`-ball around the weights.

    With :math:`g = \nabla L(w)` (computed by the caller before ``step``), summed over **all**
    parameters of all groups:

    .. math::
        T_w &= \begin{cases} |w| + \eta & \text{adaptive (ASAM, elementwise)} \\
                             1 & \text{otherwise (SAM)} \end{cases} \\
        \hat\epsilon(w) &= \rho\, \frac{T_w^2\, g}{\lVert T_w\, g \rVert_2 + \varepsilon}
            \qquad \text{(one global norm over every parameter)} \\
        g_{\text{SAM}} &= \nabla L(w)\big|_{w + \hat\epsilon(w)} \\
        w &\leftarrow \text{base step from } w \text{ with } g_{\text{SAM}}

    (Foret et al., Algorithm 1; Kwon et al., Algorithm 1.) ``eta`` (:math:`\eta`) defaults to
    0, the widely used ``adaptive=True`` form, where weights that are exactly 0 are not
    perturbed; ASAM's reference code uses :math:`\eta = 0.01` (on weights, not biases; here
    on every parameter). ASAM wants a larger :math:`\rho` than SAM (reference defaults: 0.5
    vs 0.05). Parameters without a gradient are not perturbed; a group with
    ``maximize=True`` is perturbed towards *lower* objective (the worst case for a maximizer).
    Complex parameters are perturbed as (real, imaginary) pairs, as the base optimizers step
    them (ASAM's :math:`|w|` per part); sparse gradients are refused.

    Usage (the closure computes the loss and gradients at the perturbed weights; the
    wrapper zeroes the gradients before calling it and returns its loss)::

        opt = SAM(optforge.AdamW(model.parameters(), lr=1e-3), rho=0.05)
        loss = loss_fn(model(x), y)          # the gradient at w
        loss.backward()

        def closure():                       # the loss and gradient at the perturbed weights
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        opt.zero_grad()

    ``step(closure)`` is ``first_step(zero_grad=True)``, the closure (with grad enabled),
    ``second_step()``; call them yourself for other loops. With ``torch.amp.GradScaler``
    (``scaler.step`` refuses closures), unscale before the norm and skip on inf::

        with torch.autocast(device, dtype): loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)                              # the norm needs the true gradient
        if opt.first_step(zero_grad=True, skip_nonfinite=True):   # False: inf/NaN, w untouched
            with torch.autocast(device, dtype): loss = loss_fn(model(x), y)
            scaler.scale(loss).backward()
            opt.second_step(scaler=scaler)                # restore w, scaler.step(base optimizer)
        scaler.update()                                   # backs off on an inf in either pass
        opt.zero_grad()

    DTensor parameters (FSDP2, tensor parallel): the perturbation is computed on each rank's
    local shards, and the norm over every shard (one all-reduce per mesh layout).

    SAM has no state of its own between steps: ``state_dict`` is the base optimizer's, and
    ``rho`` / ``adaptive`` / ``eta`` / ``eps`` are the wrapper's arguments (not saved).
    """

    def __init__(self, base_optimizer: torch.optim.Optimizer, rho: float = 0.05, adaptive: bool = False,
                 eta: float = 0.0, eps: float = 1e-12) -> None:
        non_negative("rho", rho)
        boolean("adaptive", adaptive)
        non_negative("eta", eta)
        positive("eps", eps)
        if eta and not adaptive:
            raise ValueError(f"invalid eta={eta!r}: eta offsets ASAM's |w|, it needs adaptive=True")
        super().__init__(base_optimizer)
        self.rho, self.adaptive, self.eta, self.eps = rho, adaptive, eta, eps
        #: parameter -> w, held only between first_step and second_step
        self._saved_weights: dict[Tensor, Tensor] | None = None

    def wrapper_options(self) -> dict[str, Any]:
        options = {"rho": self.rho, "adaptive": self.adaptive}
        return {**options, "eta": self.eta} if self.eta else options

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """The SAM step; returns the closure's loss (at the perturbed weights)."""
        if closure is None:
            raise ValueError("SAM needs a closure: opt.step(closure), after computing the gradient at the "
                             "current weights, e.g.\n" + CLOSURE_PATTERN
                             + "\n(or call opt.first_step() and opt.second_step() yourself)")
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss

    def _t_w(self, ws: list[Tensor]) -> list[Tensor]:
        t = torch._foreach_abs(ws)                                  # T_w = |w| + eta
        if self.eta:
            torch._foreach_add_(t, self.eta)
        return t

    def _params_with_grad(self) -> list[tuple[dict[str, Any], Tensor]]:
        pairs = [(group, p) for group in self.param_groups for p in group["params"] if p.grad is not None]
        if any(p.grad.is_sparse for _, p in pairs):
            raise RuntimeError("SAM does not support sparse gradients: its perturbation needs the norm of "
                               "the dense gradient")
        return pairs

    @torch.no_grad()
    def grad_norm(self) -> Tensor:
        r""":math:`\lVert T_w g\rVert_2` over every parameter with a gradient (a 0-d tensor on the
        first such parameter's device; no host synchronization)."""
        buckets: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
        for _, p in self._params_with_grad():
            check_same_layout(p.grad, p)
            w, g = _real(local(p)), _real(local(p.grad))     # DTensors: their local shards
            ws, gs = buckets.setdefault((reduction_key(p.grad), g.device, g.dtype), ([], []))
            ws.append(w)
            gs.append(g)
        if not buckets:
            raise RuntimeError("SAM.first_step: no parameter has a gradient; compute the loss and call "
                               "loss.backward() at the current weights first")
        norms, sums, keys = [], [], []
        for (mesh_key, _, _), (ws, gs) in buckets.items():
            scaled = torch._foreach_mul(self._t_w(ws), gs) if self.adaptive else gs   # T_w g
            shard_norms = torch._foreach_norm(scaled, 2)
            if mesh_key is None:
                norms.extend(shard_norms)
            else:       # the bucket's norm: its shards' sums of squares, added up over the mesh
                norms.append(len(sums))
                sums.append(torch.stack(shard_norms).square().sum())
                keys.append(mesh_key)
        totals = sum_over_meshes(sums, keys)                # one all-reduce per mesh dim
        norms = [totals[n].sqrt() if isinstance(n, int) else n for n in norms]
        device = norms[0].device
        return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), 2)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, skip_nonfinite: bool = False) -> bool:
        r"""Save :math:`w` and move to :math:`w + \hat\epsilon(w)` using the current gradients.

        With ``skip_nonfinite=True`` it first checks the norm (one host synchronization) and,
        if it is inf or NaN, changes nothing and returns False. Returns True when it
        perturbed the weights; then ``zero_grad`` clears the gradients for the next pass."""
        if self._saved_weights is not None:
            raise RuntimeError("SAM.first_step() called twice: call second_step() (or step(closure)) "
                               "to restore the weights first")
        norm = self.grad_norm()
        if skip_nonfinite and not math.isfinite(norm.item()):
            return False
        pairs = self._params_with_grad()
        self._saved_weights = {p: p.detach().clone(memory_format=torch.preserve_format) for _, p in pairs}
        buckets: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
        for group, p in pairs:
            sign = -1.0 if group.get("maximize", False) else 1.0
            w = _real(local(p))
            ws, gs = buckets.setdefault((w.device, w.dtype, sign), ([], []))
            ws.append(w)
            gs.append(_real(local(p.grad)))
        for (device, dtype, sign), (ws, gs) in buckets.items():
            scale = (sign * self.rho / (norm + self.eps)).to(device=device, dtype=dtype)  # rho / ||T_w g||
            e = torch._foreach_mul(gs, scale)                                              # rho g / ||T_w g||
            if self.adaptive:
                t = self._t_w(ws)
                torch._foreach_mul_(e, t)
                torch._foreach_mul_(e, t)                                                  # T_w^2 g
            torch._foreach_add_(ws, e)                                                     # w <- w + e
        if zero_grad:
            self.zero_grad()
        return True

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, scaler: Any = None) -> None:
        """Restore :math:`w` and take the base optimizer's step with the current gradients
        (those at the perturbed weights): ``base.step()``, or ``scaler.step(base)`` given a
        ``GradScaler`` (which unscales them and skips the step on inf/NaN)."""
        if self._saved_weights is None:
            raise RuntimeError("SAM.second_step() without first_step(): there is no perturbation to undo")
        saved, self._saved_weights = self._saved_weights, None
        buckets: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
        for p, w in saved.items():
            ws, olds = buckets.setdefault((p.device, p.dtype), ([], []))
            ws.append(local(p))
            olds.append(local(w))
        for ws, olds in buckets.values():
            torch._foreach_copy_(ws, olds)             # back to w: the step starts from w, not w + e
        if scaler is None:
            self.base_optimizer.step()
        else:
            scaler.step(self.base_optimizer)
        if zero_grad:
            self.zero_grad()


def _real(x: Tensor) -> Tensor:
    """A complex tensor as (re, im) pairs, as the base optimizers step it (ASAM's |w| per part)."""
    return torch.view_as_real(x) if x.is_complex() else x
