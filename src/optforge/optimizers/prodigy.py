"""Prodigy: Adam with a learning rate estimated from the distance to the solution."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..base import Optimizer, ParamsT
from ..constraints import (
    beta_tuple,
    boolean,
    non_negative,
    optional,
    positive,
    positive_or_inf,
    unit_interval,
)
from ..distributed import full_sums, local
from ..registry import register


class Prodigy(Optimizer):
    r"""Prodigy (Mishchenko & Defazio, 2024, "Prodigy: An Expeditiously Adaptive Parameter-Free
    Learner", Algorithm 4, Adam version), as ``prodigyopt.Prodigy`` 1.1.2 computes it.

    Per param group, with :math:`k` the group's step count (0 on the first step), :math:`d_k`
    its D estimate (:math:`d_0` = ``d0``), :math:`\beta_3` = ``beta3`` (default
    :math:`\sqrt{\beta_2}`), :math:`\eta_k = d_k\, \mathrm{lr}\, b_k` with
    :math:`b_k = \sqrt{1 - \beta_2^{k+1}} / (1 - \beta_1^{k+1})` if ``use_bias_correction``
    else 1, and sums over every tensor of the group:

    .. math::
        m &\leftarrow \beta_1 m + d_k (1 - \beta_1) g, \qquad
        v \leftarrow \beta_2 v + d_k^2 (1 - \beta_2) g^2 \\
        r_{k+1} &= \beta_3 r_k + \tfrac{d_k}{d_0}\, \eta_k \langle g, x_0 - x \rangle \\
        s &\leftarrow \beta_3 s + \tfrac{d_k}{d_0}\, \gamma_k\, g, \qquad
            \gamma_k = d_k \text{ if } \texttt{safeguard\_warmup} \text{ else } \eta_k \\
        \hat{d}_{k+1} &= d_\text{coef}\, r_{k+1} / \textstyle\sum \lVert s \rVert_1, \qquad
        d_\max \leftarrow \max(d_\max, \hat{d}_{k+1}) \\
        d_{k+1} &= \min\bigl(d_\max,\ \texttt{growth\_rate} \cdot
            \max(d_k, \hat{d}_{k+1} \text{ on the first growth, i.e. while } d_k = d_0)\bigr) \\
        x &\leftarrow x - \eta_k \lambda x - \eta_k\, m / (\sqrt{v} + d_{k+1} \epsilon)

    (with :math:`\beta_1 = 0` the last term is :math:`\eta_k d_{k+1} g / (\sqrt{v} + d_{k+1}\epsilon)`).
    While :math:`\sum \lVert s \rVert_1 = 0` (no gradient yet) the moments update and nothing
    else does, as in the reference.

    Differences from the reference: the D estimate is **per param group** (the reference
    shares one across all groups, requires them to share the lr and reads betas, ``d_coef``
    and ``growth_rate`` from the first group); a model in one group, the usual case, steps
    identically, and two groups step as two reference optimizers would. ``slice_p`` and
    ``fsdp_in_use`` are not offered (DTensor parameters are refused: elementwise=False).

    Weight decay: ``weight_decay_mode="decoupled"`` (the default, the reference's
    ``decouple=True``) is :math:`x \leftarrow x - \eta_k \lambda x` after the D update, as
    above; ``"coupled"`` (``decouple=False``) adds :math:`\lambda x` to :math:`g`;
    ``"absolute"`` multiplies :math:`x` by :math:`1 - \lambda`.

    Not elementwise (the D estimate reduces over the whole group): eager only, with one host
    sync per group and step; ``fused=True`` is refused. Each sum runs over a whole tensor, as
    in the reference (a sum over slices would round differently, and D amplifies that), so an
    eager CPU step keeps one parameter-sized temporary, :math:`x_0 - x` then :math:`|s|` then
    :math:`\sqrt{v}`: 4 bytes per float32 parameter of scratch held between steps
    (:mod:`optforge.scratch`; with ``maximize`` or ``"coupled"`` decay, the gradient the step
    reads is a second temporary, allocated again each step). The group's ``d``, ``d_max``,
    ``d_numerator``, ``d_hat``, ``d_denom`` and ``k`` live in the param group (saved with
    ``state_dict``), as in the reference. State: ``step``, ``s``, ``p0`` (the initial
    parameters), ``exp_avg`` (if :math:`\beta_1 > 0`), ``exp_avg_sq``.
    """

    shard_reductions = True      # its sums over the group are over every shard of a DTensor
    no_fused_reason = "its step size D is estimated from sums over all parameters"
    constraints = dict(betas=beta_tuple(2), beta3=optional(unit_interval), eps=non_negative, d0=positive,
                       d_coef=positive, growth_rate=positive_or_inf, use_bias_correction=boolean,
                       safeguard_warmup=boolean)

    def __init__(self, params: ParamsT, lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.999),
                 beta3: float | None = None, eps: float = 1e-8, weight_decay: float = 0.0,
                 use_bias_correction: bool = False,
                 safeguard_warmup: bool = False, d0: float = 1e-6, d_coef: float = 1.0,
                 growth_rate: float = math.inf, *, weight_decay_mode: str = "decoupled",
                 maximize: bool = False, fused: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, beta3=beta3, eps=eps, weight_decay=weight_decay,
                                      use_bias_correction=use_bias_correction,
                                      safeguard_warmup=safeguard_warmup, d0=d0, d_coef=d_coef,
                                      growth_rate=growth_rate, weight_decay_mode=weight_decay_mode,
                                      maximize=maximize, fused=fused))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for name, value in dict(d=group["d0"], d_max=group["d0"], d_numerator=0.0, k=0).items():
            group.setdefault(name, value)

    def state_names_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("s", "p0") + (("exp_avg",) if group["betas"][0] > 0 else ()) + ("exp_avg_sq",)

    def init_state(self, group: dict[str, Any], p: torch.Tensor, name: str) -> torch.Tensor:
        if name == "p0":                                      # x_0: the parameters at their first step
            return p.detach().clone(memory_format=torch.preserve_format)
        return super().init_state(group, p, name)

    def state_shape(self, group: dict[str, Any], p: torch.Tensor, name: str) -> tuple[int, ...]:
        return tuple(p.shape)

    def decay_lr(self, group: dict[str, Any], t: list[float]) -> float:
        return 0.0    # "decoupled": applied after the D update (_group_step); the base's is a no-op

    def step_group(self, group: dict[str, Any], buckets: list[Any]) -> None:
        # the D update needs sums over every bucket (device, dtype) of the group
        work = [self.prepare(group, b) for b in buckets]
        self._group_step(group, work)
        for w in work:
            self.finish(group, w)

    def _group_step(self, group: dict[str, Any], work: list[tuple]) -> None:
        (b1, b2), eps, wd = group["betas"], group["eps"], group["weight_decay"]
        beta3 = group["beta3"] if group["beta3"] is not None else math.sqrt(b2)
        k, d, d0, lr = group["k"], group["d"], group["d0"], float(group["lr"])
        bc = math.sqrt(1 - b2 ** (k + 1)) / (1 - b1 ** (k + 1)) if group["use_bias_correction"] else 1.0
        dlr = d * lr * bc                                              # eta_k
        dot, l1, dot_of, l1_of = [], [], [], []
        if lr > 0:
            for _, p, g, s, _ in work:
                diff = s["p0"].sub(p)                                  # x_0 - x
                # per tensor, over its local shard (a DTensor's: FSDP2), added up below
                dot += [torch.dot(local(a).reshape(-1), local(c).reshape(-1)) for a, c in zip(g, diff)]
                del diff            # so that |s| below (and sqrt(v) after) reuse its scratch buffer
                if b1 > 0:
                    s["exp_avg"].mul_(b1).add_(g, alpha=d * (1 - b1))  # m <- b1 m + d (1 - b1) g
                s["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=d * d * (1 - b2))  # v <- b2 v + d^2(1-b2) g^2
                s["s"].mul_(beta3).add_(g, alpha=(d / d0) * (d if group["safeguard_warmup"] else dlr))
                l1 += [local(x).sum() for x in s["s"].abs()]           # ||s||_1 (the reference's sum)
                dot_of += g
                l1_of += s["s"]
        if not l1:
            return
        # one host sync; then the sums in the reference's order (in float64, term by term: the
        # D estimate feeds back into every step, so its rounding is amplified over the run)
        values = torch.stack(full_sums(dot + l1, dot_of + l1_of)).tolist()
        delta, d_denom = 0.0, 0.0
        for x in values[:len(dot)]:
            delta += (d / d0) * dlr * x                                # <g, x_0 - x> d/d0 eta_k
        for x in values[len(dot):]:
            d_denom += x
        if d_denom == 0:                    # no gradient yet: the reference stops here too
            return
        d_numerator = group["d_numerator"] * beta3 + delta             # r_{k+1}
        d_hat = group["d_coef"] * d_numerator / d_denom
        d_max = max(group["d_max"], d_hat)
        d_new = min(d_max, (max(d, d_hat) if d == d0 else d) * group["growth_rate"])
        group.update(d_numerator=d_numerator, d_denom=d_denom, d=d_new, d_max=d_max, d_hat=d_hat)
        for _, p, g, s, _ in work:
            denom = s["exp_avg_sq"].sqrt().add_(d_new * eps)           # sqrt(v) + d_{k+1} eps
            if group["weight_decay_mode"] == "decoupled" and wd != 0:
                p.add_(p, alpha=-wd * dlr)                             # x <- x - eta_k lambda x
            if b1 > 0:
                p.addcdiv_(s["exp_avg"], denom, -dlr)                  # x <- x - eta_k m / denom
            else:
                p.addcdiv_(g, denom, -dlr * d_new)
        group["k"] = k + 1


register(Prodigy, "Prodigy: Adam with a learned step size D, lr=1 (Mishchenko & Defazio, 2024)",
         elementwise=False)
