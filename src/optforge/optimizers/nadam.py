"""NAdam: Adam with Nesterov momentum (torch.optim semantics)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..base import Optimizer, ParamsT, _step_dtype
from ..constraints import beta_tuple, non_negative
from ..registry import register
from ..steps import step_values
from ..torch_compat import DECOUPLED_WEIGHT_DECAY
from .scalar_state import load_keeping_scalars, stacked_scalars


class NAdam(Optimizer):
    r"""NAdam (Dozat, 2016), as ``torch.optim.NAdam`` computes it.

    With :math:`\psi` the momentum decay:

    .. math::
        \mu_t &= \beta_1 \left(1 - \tfrac12\, 0.96^{t \psi}\right), \qquad
        \Pi_t = \prod_{i \le t} \mu_i \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \qquad
        d_t = \sqrt{v_t / (1 - \beta_2^t)} + \epsilon \\
        \theta_t &= \theta_{t-1} - \mathrm{lr} \frac{1 - \mu_t}{1 - \Pi_t} \frac{g_t}{d_t}
                   - \mathrm{lr} \frac{\mu_{t+1}}{1 - \Pi_t \mu_{t+1}} \frac{m_t}{d_t}

    Weight decay is coupled L2 by default; ``decoupled_weight_decay=True`` (torch's name) or
    ``weight_decay_mode="decoupled"`` is NAdamW. State: ``step``, ``exp_avg`` (m),
    ``exp_avg_sq`` (v) and ``mu_product`` (:math:`\Pi_t`, a 0-d tensor in the step's dtype,
    multiplied in place each step as torch does, so both round it alike).

    torch's signature (``foreach``, ``capturable``, ``differentiable``: see
    :mod:`optforge.torch_compat`), and ``fused``, which torch's NAdam has not.
    """

    constraints = dict(betas=beta_tuple(2), eps=non_negative, momentum_decay=non_negative,
                       **DECOUPLED_WEIGHT_DECAY)
    state_names = ("exp_avg", "exp_avg_sq")
    state_kinds = dict(exp_avg_sq="non_negative")

    def __init__(self, params: ParamsT, lr: float | Tensor = 2e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, momentum_decay: float = 4e-3,
                 decoupled_weight_decay: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 weight_decay_mode: str | None = None, fused: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      momentum_decay=momentum_decay,
                                      decoupled_weight_decay=decoupled_weight_decay, foreach=foreach,
                                      maximize=maximize, capturable=capturable, differentiable=differentiable,
                                      weight_decay_mode=weight_decay_mode, fused=fused))
        self._mu_products: list[float] = []   # the current bucket's Pi_t, one per param

    @staticmethod
    def _mu(group: dict[str, Any], t: float) -> float:
        return group["betas"][0] * (1.0 - 0.5 * 0.96 ** (t * group["momentum_decay"]))

    def step_group(self, group: dict[str, Any], buckets: list) -> None:
        for b in buckets:
            t = [s + 1 for s in step_values(b.steps)]
            mus = [self._mu(group, ti) for ti in t]
            products = stacked_scalars(b.states, "mu_product", _step_dtype(), 1.0)
            if products is not None:     # Pi_t = Pi_{t-1} mu_t, for the whole bucket at once
                products.mul_(mus[0] if len(set(mus)) == 1 else torch.tensor(mus, dtype=products.dtype))
                self._mu_products = products.tolist()
            else:                        # loaded in differing dtypes: each in its own
                for st, mu in zip(b.states, mus):
                    st["mu_product"].mul_(mu)
                self._mu_products = [float(st["mu_product"]) for st in b.states]
            # updates over part of the bucket (low-bit state runs it in chunks) find Pi_t by step
            self._mu_by_step = dict(zip(t, self._mu_products))
            self.step_bucket(group, b)

    def _fused_step(self, group: dict[str, Any], b: Any) -> bool:
        # one fused kernel takes one Pi_t: params with differing products step eagerly
        return len(set(self._mu_products)) == 1 and super()._fused_step(group, b)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """See :func:`optforge.optimizers.scalar_state.load_keeping_scalars`."""
        load_keeping_scalars(self, state_dict, ("mu_product",), super().load_state_dict)

    def _coefficients(self, group: dict[str, Any], t: float, mu_product: float) -> dict[str, float]:
        # Adam's folding of the bias correction (one pass fewer than dividing v by it):
        # a g / (sqrt(v / (1 - b2^t)) + eps) = a k g / (sqrt(v) + eps k), k = sqrt(1 - b2^t);
        # a g / d + b m / d = a (g + (b / a) m) / d: one addcdiv_ (1 - mu_t > 0 as b1 < 1)
        lr, b2 = group["lr"], group["betas"][1]
        mu, mu_next = self._mu(group, t), self._mu(group, t + 1)
        k = math.sqrt(1 - b2**t)
        return dict(eps=group["eps"] * k, step=-lr * k * (1.0 - mu) / (1.0 - mu_product),
                    mix=mu_next * (1.0 - mu_product) / ((1.0 - mu) * (1.0 - mu_product * mu_next)))

    def scalars(self, group: dict[str, Any], t: float) -> dict[str, float]:
        return self._coefficients(group, t, self._mu_products[0])

    def update(self, group, p, g, s, t) -> None:
        products = (self._mu_products if len(t) == len(self._mu_products)
                    else [self._mu_by_step[ti] for ti in t])
        if len(set(t)) == 1 and len(set(products)) == 1:    # the usual case: numbers, once
            c = self._coefficients(group, t[0], products[0])
        else:
            per_param = [self._coefficients(group, ti, pi) for ti, pi in zip(t, products)]
            c = {k: [x[k] for x in per_param] for k in per_param[0]}
            c = {k: v[0] if len(set(v)) == 1 else v for k, v in c.items()}
        self.kernel(group, p, g, s, c)

    @staticmethod
    def kernel(group, p, g, s, c):
        b1, b2 = group["betas"]
        m, v = s["exp_avg"], s["exp_avg_sq"]
        m.lerp_(g, 1 - b1)                                   # m_t = b1 m + (1 - b1) g
        v.mul_(b2).addcmul_(g, g, value=1 - b2)              # v_t = b2 v + (1 - b2) g^2
        d = v.sqrt().add_(c["eps"])                          # k d_t = sqrt(v_t) + eps k
        # theta -= lr ((1 - mu_t)/(1 - Pi_t) g + mu_{t+1}/(1 - Pi_{t+1}) m) / d_t
        p.addcdiv_(g.add(m, alpha=c["mix"]), d, c["step"])


register(NAdam, "NAdam: Adam with Nesterov momentum (Dozat, 2016); decoupled_weight_decay option")
