"""Prodigy: Adam with a learning rate estimated from the distance to the solution.

Not registered or exported yet (import it from ``optforge.optimizers.prodigy``): its D
estimate couples the tensors of a param group, which the conformance suite's "a tensor's
update never depends on which tensors share its group" tests refuse by design.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..base import Optimizer, ParamsT
from ..constraints import beta_tuple, boolean, non_negative, positive, unit_interval
from ..precision import stochastic_round_
from ..steps import advance_steps
from ..tensorlist import TensorList
from ..weight_decay import apply_weight_decay


def _optional_beta(name: str, value: Any) -> None:
    if value is not None:
        unit_interval(name, value)


def _growth(name: str, value: Any) -> None:
    if value != math.inf:
        positive(name, value)


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
    ``"absolute"`` multiplies :math:`x` by :math:`1 - \lambda`. ``decouple`` is accepted for
    drop-in compatibility and sets the mode.

    Not elementwise (the D estimate reduces over the whole group): eager only, with one host
    sync per group and step; ``fused=True`` is refused. The group's ``d``, ``d_max``,
    ``d_numerator``, ``d_hat``, ``d_denom`` and ``k`` live in the param group (saved with
    ``state_dict``), as in the reference. State: ``step``, ``s``, ``p0`` (the initial
    parameters), ``exp_avg`` (if :math:`\beta_1 > 0`), ``exp_avg_sq``.
    """

    constraints = dict(betas=beta_tuple(2), beta3=_optional_beta, eps=non_negative, d0=positive,
                       d_coef=positive, growth_rate=_growth, use_bias_correction=boolean,
                       safeguard_warmup=boolean)

    def __init__(self, params: ParamsT, lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.999),
                 beta3: float | None = None, eps: float = 1e-8, weight_decay: float = 0.0,
                 decouple: bool | None = None, use_bias_correction: bool = False,
                 safeguard_warmup: bool = False, d0: float = 1e-6, d_coef: float = 1.0,
                 growth_rate: float = math.inf, *, weight_decay_mode: str = "decoupled",
                 maximize: bool = False, fused: bool = False) -> None:
        if decouple is not None:
            wanted = "decoupled" if decouple else "coupled"
            if weight_decay_mode not in ("decoupled", wanted):
                raise ValueError(f"decouple={decouple} contradicts weight_decay_mode={weight_decay_mode!r}: "
                                 "give one of them")
            weight_decay_mode = wanted
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

    @torch.no_grad()
    def step(self, closure=None):
        """One step (see the class doc); returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._prodigy_step()
        return loss

    @torch._disable_dynamo
    def _prodigy_step(self) -> None:
        # The base's step loop, with the update split in two around the group's D update:
        # it needs sums over every bucket (device, dtype) of the group.
        if any(group.get("skip_nonfinite") for group in self.param_groups) and not self._grads_finite():
            self.skipped_steps += 1
            return
        for group in self.param_groups:
            work = [self._prepare(group, b) for b in self._buckets(group)]
            if work:
                self._group_step(group, work)

    def _prepare(self, group: dict[str, Any], b: Any) -> tuple:
        """(bucket, p, g, s, low precision) with maximize and coupled/absolute decay applied."""
        t = advance_steps(b.steps)
        p, g, s, owned = b.p, b.g, b.s, False
        fresh = [i for i, k in enumerate(t) if k == 1]
        if fresh:                                             # x_0: the parameters at their first step
            torch._foreach_copy_([b.s["p0"][i] for i in fresh], [b.p[i] for i in fresh])
        if b.low_precision:                                   # computed in float32 (see precision.py)
            if group.get("stochastic_rounding") and b.key[1] != torch.bfloat16:
                raise ValueError(f"stochastic_rounding supports bfloat16 parameters, got {b.key[1]} "
                                 "(use fp32_state for float16)")
            p = TensorList(x.float() for x in b.p)
            g, owned = TensorList(x.float() for x in b.g), True
            s = {name: TensorList(x.float() for x in xs) for name, xs in b.s.items()}
        g = self.transform_grads(group, g)
        if group["maximize"]:
            g, owned = g.neg(), True
        if group["weight_decay_mode"] != "decoupled":         # decoupled: in _group_step
            g = apply_weight_decay(group["weight_decay_mode"], group["weight_decay"], p, g, 0.0, owned)
        return b, p, g, s

    def _group_step(self, group: dict[str, Any], work: list[tuple]) -> None:
        (b1, b2), eps, wd = group["betas"], group["eps"], group["weight_decay"]
        beta3 = group["beta3"] if group["beta3"] is not None else math.sqrt(b2)
        k, d, d0, lr = group["k"], group["d"], group["d0"], float(group["lr"])
        bc = math.sqrt(1 - b2 ** (k + 1)) / (1 - b1 ** (k + 1)) if group["use_bias_correction"] else 1.0
        dlr = d * lr * bc                                              # eta_k
        dot, l1 = [], []
        if lr > 0:
            for _, p, g, s in work:
                diff = TensorList(torch._foreach_sub(s["p0"], p))      # x_0 - x
                dot += [torch.dot(a.reshape(-1), c.reshape(-1)) for a, c in zip(g, diff)]
                if b1 > 0:
                    s["exp_avg"].mul_(b1).add_(g, alpha=d * (1 - b1))  # m <- b1 m + d (1 - b1) g
                s["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=d * d * (1 - b2))  # v <- b2 v + d^2(1-b2) g^2
                s["s"].mul_(beta3).add_(g, alpha=(d / d0) * (d if group["safeguard_warmup"] else dlr))
                l1 += [x.abs().sum() for x in s["s"]]                  # ||s||_1 (the reference's sum)
        if not l1:
            return self._write_back(group, work)
        # one host sync; then the sums in the reference's order (in float64, term by term: the
        # D estimate feeds back into every step, so its rounding is amplified over the run)
        values = torch.stack(dot + l1).tolist()
        delta, d_denom = 0.0, 0.0
        for x in values[:len(dot)]:
            delta += (d / d0) * dlr * x                                # <g, x_0 - x> d/d0 eta_k
        for x in values[len(dot):]:
            d_denom += x
        if d_denom == 0:                    # no gradient yet: the reference stops here too
            return self._write_back(group, work)
        d_numerator = group["d_numerator"] * beta3 + delta             # r_{k+1}
        d_hat = group["d_coef"] * d_numerator / d_denom
        d_max = max(group["d_max"], d_hat)
        d_new = min(d_max, (max(d, d_hat) if d == d0 else d) * group["growth_rate"])
        group.update(d_numerator=d_numerator, d_denom=d_denom, d=d_new, d_max=d_max, d_hat=d_hat)
        for _, p, g, s in work:
            denom = s["exp_avg_sq"].sqrt().add_(d_new * eps)           # sqrt(v) + d_{k+1} eps
            if group["weight_decay_mode"] == "decoupled" and wd != 0:
                p.add_(p, alpha=-wd * dlr)                             # x <- x - eta_k lambda x
            if b1 > 0:
                p.addcdiv_(s["exp_avg"], denom, -dlr)                  # x <- x - eta_k m / denom
            else:
                p.addcdiv_(g, denom, -dlr * d_new)
        group["k"] = k + 1
        self._write_back(group, work)

    @staticmethod
    def _write_back(group: dict[str, Any], work: list[tuple]) -> None:
        """Low-precision buckets: float32 results into the parameters and their state."""
        for b, p, _, s in work:
            if not b.low_precision:
                continue
            for name, xs in b.s.items():
                pairs = [(x, y) for x, y in zip(xs, s[name]) if x is not y]
                if pairs:
                    torch._foreach_copy_([x for x, _ in pairs], [y for _, y in pairs])
            if group.get("stochastic_rounding"):
                for x, y in zip(b.p, p):
                    stochastic_round_(x, y)
            else:
                torch._foreach_copy_(b.p, p)

