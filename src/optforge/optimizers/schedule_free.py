"""Schedule-Free SGD and AdamW (Defazio et al., 2024), as the ``schedulefree`` package computes them.

Schedule-Free keeps two sequences per parameter: ``z`` (the SGD/Adam iterate, in the state)
and ``x`` (a weighted average of the ``z``), and evaluates the gradient at their interpolation
``y = (1 - beta) z + beta x``. The parameters hold ``y`` while training and ``x`` for
evaluation, so **users must call** ``opt.train()`` before training steps and ``opt.eval()``
before evaluating or saving a checkpoint (and ``opt.train()`` again to resume)::

    opt = optforge.ScheduleFreeAdamW(model.parameters(), lr=2.5e-3, warmup_steps=1000)
    opt.train(); model.train()
    for x, y in loader: ...; opt.step()
    opt.eval(); model.eval()        # parameters now hold x: evaluate / save here

A new optimizer starts in train mode (as the reference does after its first ``train()``, which
moves nothing before the state exists); ``step()`` in eval mode raises, as the reference does.
"""

from __future__ import annotations

from typing import Any

import torch

from ..base import Optimizer, ParamsT
from ..constraints import beta_tuple, integer_at_least, non_negative, unit_interval
from ..registry import register

__all__ = ["ScheduleFreeAdamW", "ScheduleFreeSGD"]


class _ScheduleFree(Optimizer):
    r"""What both variants share: ``train()`` / ``eval()`` and the averaging weight.

    With :math:`t` the step count (1 on the first step), ``warmup_steps`` :math:`T_w`,
    ``r`` and ``weight_lr_power`` :math:`q`:

    .. math::
        \gamma_t &= \mathrm{lr} \cdot \min(1, t / T_w) \quad \text{(linear warmup)} \\
        w_t &= t^r\, (\max_{k \le t} \gamma_k)^q, \qquad c_{t+1} = w_t / \textstyle\sum_{k \le t} w_k

    The reference keeps :math:`k` and :math:`\sum w` per param group, and its
    :math:`\max \gamma` over the lr history; here they are functions of each tensor's own step
    count at the group's current lr (optforge's convention: a tensor's update never depends on
    which tensors share its group). Identical while the lr is constant and every parameter gets
    a gradient every step, which is how Schedule-Free is meant to run (it needs no schedule).
    """

    _beta_key: str = "momentum"
    # z is the iterate itself, not a statistic: low-bit state would round the parameters' path
    state_kinds = dict(z="full", exp_avg_sq="non_negative")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        # the mode lives in the group, as in the reference (saved with state_dict)
        mode = self.param_groups[0].get("train_mode", True)
        self.param_groups[-1].setdefault("train_mode", mode)

    def _beta(self, group: dict[str, Any]) -> float:
        return group["betas"][0] if self._beta_key == "betas" else group["momentum"]

    @torch.no_grad()
    def train(self) -> None:
        """Parameters <- y = (1 - beta) z + beta x (for training steps)."""
        self._switch(True)

    @torch.no_grad()
    def eval(self) -> None:
        """Parameters <- x (for evaluation and checkpoints)."""
        self._switch(False)

    def _switch(self, train: bool) -> None:
        for group in self.param_groups:
            if (not train and group.get("train_mode", True) and self._beta(group) == 0
                    and any("z" in self.state.get(p, {}) for p in group["params"])):
                raise ValueError(f"{type(self).__name__}.eval() needs {self._beta_key} > 0: with "
                                 "beta = 0 the parameters y equal z and x cannot be recovered")
        for group in self.param_groups:
            if group.get("train_mode", True) == train:
                continue
            beta = self._beta(group)
            # y = x + (1 - beta)(z - x);  x = y + (1 - 1/beta)(z - y)
            weight = 1 - beta if train else 1 - 1 / beta
            ps = [p for p in group["params"] if "z" in self.state.get(p, {})]
            if ps:
                torch._foreach_lerp_(ps, [self.state[p]["z"].to(p.device) for p in ps], weight)
            group["train_mode"] = train

    def step(self, closure=None):
        if not all(group.get("train_mode", True) for group in self.param_groups):
            raise RuntimeError(f"{type(self).__name__}.step() called in eval mode: call opt.train() "
                               "before training steps (and opt.eval() before evaluating)")
        return super().step(closure)

    def init_state(self, group: dict[str, Any], p: torch.Tensor, name: str) -> torch.Tensor:
        if name == "z":                                       # z_1 = x_1 = y_1 = the parameters
            z = p.detach().clone(memory_format=torch.preserve_format)
            # z is an iterate, not a statistic: with stochastic_rounding (bf16 params) it is kept
            # in float32, or its small steps would round away as plain bf16 params' do
            return z.float() if group.get("stochastic_rounding") and z.dtype == torch.bfloat16 else z
        return super().init_state(group, p, name)

    def _schedule(self, group: dict[str, Any], t: float) -> tuple[float, float]:
        """(gamma_t, c_{t+1}) for step t."""
        lr, warmup = float(group["lr"]), group["warmup_steps"]
        r, q = group["r"], group["weight_lr_power"]

        def gamma(k: int) -> float:
            return lr * (k / warmup if k <= warmup else 1.0)

        t = int(t)
        # sum_{k<=t} w_k, extended from the nearest memoized count (the last few per setting)
        memos = self.__dict__.setdefault("_weight_sums", {})
        memo = memos.setdefault((lr, warmup, r, q), {0: 0.0})
        while len(memos) > 8:
            memos.pop(next(iter(memos)))
        total = memo.get(t)
        if total is None:
            start = max(k for k in memo if k < t)
            total = memo[start]
            for k in range(start + 1, t + 1):
                total += k**r * gamma(k) ** q                 # w_k (gamma is non-decreasing: its max)
            memo[t] = total
            for k in sorted(memo)[1:-4]:
                del memo[k]
        weight = t**r * gamma(t) ** q
        return gamma(t), (weight / total if total != 0 else 0.0)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The base checks state shapes only for optimizers with its own init_state; z is
        # created otherwise (a copy of the parameter), so the check is done here.
        if isinstance(state_dict, dict) and {"state", "param_groups"} <= set(state_dict):
            saved = [k for g in state_dict["param_groups"] for k in g["params"]]
            params = [p for g in self.param_groups for p in g["params"]]
            if [len(g["params"]) for g in state_dict["param_groups"]] == [len(g["params"]) for g in
                                                                         self.param_groups]:
                for k, p in zip(saved, params):
                    for n, x in state_dict["state"].get(k, {}).items():
                        if n != "step" and torch.is_tensor(x) and x.shape != p.shape:
                            raise ValueError(f"the loaded state {n!r} of parameter {k} has shape "
                                             f"{tuple(x.shape)}, the parameter has shape {tuple(p.shape)}")
        super().load_state_dict(state_dict)


class ScheduleFreeSGD(_ScheduleFree):
    r"""Schedule-Free SGD (Defazio et al., 2024, "The Road Less Scheduled", Algorithm 1), as
    ``schedulefree.SGDScheduleFree`` computes it. Call ``train()`` / ``eval()`` (module doc).

    With :math:`\gamma_t` and :math:`c_{t+1}` from :class:`_ScheduleFree` and :math:`\beta` the
    ``momentum``, the parameters hold :math:`y`, and :math:`x` is never stored:

    .. math::
        y_{t+1} &= (1 - c_{t+1})\, y_t + c_{t+1} z_t + \gamma_t (\beta (1 - c_{t+1}) - 1)\, g_t \\
        z_{t+1} &= z_t - \gamma_t g_t

    (equivalently :math:`x_{t+1} = (1 - c_{t+1}) x_t + c_{t+1} z_{t+1}`,
    :math:`y_{t+1} = (1 - \beta) z_{t+1} + \beta x_{t+1}`). Weight decay is coupled L2 by
    default, as in the reference (:math:`g_t \leftarrow g_t + \lambda y_t`). State: ``step``, ``z``.
    """

    constraints = dict(momentum=unit_interval, warmup_steps=integer_at_least(0), r=non_negative,
                       weight_lr_power=non_negative)
    state_names = ("z",)

    def __init__(self, params: ParamsT, lr: float = 1.0, momentum: float = 0.9, weight_decay: float = 0.0,
                 warmup_steps: int = 0, r: float = 0.0, weight_lr_power: float = 2.0, *,
                 weight_decay_mode: str = "coupled", maximize: bool = False, fused: bool = False) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power,
                                      weight_decay_mode=weight_decay_mode, maximize=maximize, fused=fused))

    def scalars(self, group: dict[str, Any], t: float) -> dict[str, float]:
        gamma, ckp1 = self._schedule(group, t)
        return dict(ckp1=ckp1, y_step=gamma * (group["momentum"] * (1 - ckp1) - 1), z_step=-gamma)

    @staticmethod
    def kernel(group, p, g, s, c):
        z = s["z"]
        p.lerp_(z, c["ckp1"])                   # y <- (1 - c) y + c z
        p.add_(g, alpha=c["y_step"])            # y <- y + gamma (beta (1 - c) - 1) g
        z.add_(g, alpha=c["z_step"])            # z <- z - gamma g


class ScheduleFreeAdamW(_ScheduleFree):
    r"""Schedule-Free AdamW (Defazio et al., 2024, "The Road Less Scheduled", Algorithm 1 with
    Adam's preconditioner), as ``schedulefree.AdamWScheduleFree`` computes it. Call
    ``train()`` / ``eval()`` (module doc).

    With :math:`\gamma_t`, :math:`c_{t+1}` from :class:`_ScheduleFree`, the parameters holding
    :math:`y`:

    .. math::
        v_t &= \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
        \hat{g}_t &= \frac{g_t}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon} + \lambda y_t \\
        y_{t+1} &= (1 - c_{t+1})\, y_t + c_{t+1} z_t + \gamma_t (\beta_1 (1 - c_{t+1}) - 1)\, \hat{g}_t \\
        z_{t+1} &= z_t - \gamma_t \hat{g}_t

    Weight decay: ``weight_decay_mode="decoupled"`` (the default) is the reference's,
    :math:`\lambda y_t` added to the normalized gradient as above (the base's multiplicative
    decoupled decay is then not applied); ``"coupled"`` adds :math:`\lambda y_t` to :math:`g_t`
    (it enters :math:`v`), ``"absolute"`` multiplies the parameters by :math:`1 - \lambda`.
    State: ``step``, ``z``, ``exp_avg_sq`` (v).
    """

    _beta_key = "betas"
    constraints = dict(betas=beta_tuple(2), eps=non_negative, warmup_steps=integer_at_least(0),
                       r=non_negative, weight_lr_power=non_negative)
    state_names = ("z", "exp_avg_sq")

    def __init__(self, params: ParamsT, lr: float = 0.0025, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, warmup_steps: int = 0, r: float = 0.0,
                 weight_lr_power: float = 2.0, *, weight_decay_mode: str = "decoupled",
                 maximize: bool = False, fused: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power,
                                      weight_decay_mode=weight_decay_mode, maximize=maximize, fused=fused))

    def decay_lr(self, group: dict[str, Any], t: list[float]) -> float:
        return 0.0    # "decoupled": the reference's decay, applied in kernel(); the base's is a no-op

    def scalars(self, group: dict[str, Any], t: float) -> dict[str, float]:
        gamma, ckp1 = self._schedule(group, t)
        b1, b2 = group["betas"]
        # Adam's folding of the bias correction (one pass fewer than dividing v by it):
        # g_hat = k u, u = g / (sqrt(v_t) + eps k) + (lambda / k) y_t, k = sqrt(1 - b2^t)
        k = (1 - b2**t) ** 0.5
        return dict(ckp1=ckp1, eps=group["eps"] * k, decay=group["weight_decay"] / k,
                    y_step=gamma * (b1 * (1 - ckp1) - 1) * k, z_step=-gamma * k)

    @staticmethod
    def kernel(group, p, g, s, c):
        _, b2 = group["betas"]
        z, v = s["z"], s["exp_avg_sq"]
        v.mul_(b2).addcmul_(g, g, value=1 - b2)                 # v_t = b2 v + (1 - b2) g^2
        den = v.sqrt().add_(c["eps"])                           # sqrt(v_t) + eps k
        if group["weight_decay_mode"] == "decoupled" and group["weight_decay"] != 0:
            u = g.div(den).add_(p, alpha=c["decay"])            # u = g / den + lambda y_t / k
            p.lerp_(z, c["ckp1"])                               # y <- (1 - c) y + c z
            p.add_(u, alpha=c["y_step"])                        # y <- y + gamma (b1 (1 - c) - 1) g_hat
            z.add_(u, alpha=c["z_step"])                        # z <- z - gamma g_hat
        else:                                                   # u = g / den: no temporary for it
            p.lerp_(z, c["ckp1"])
            p.addcdiv_(g, den, c["y_step"])
            z.addcdiv_(g, den, c["z_step"])


register(ScheduleFreeSGD, "Schedule-Free SGD (Defazio et al., 2024); call opt.train()/opt.eval()",
         name="schedule_free_sgd", aliases=("sgdschedulefree", "schedulefreesgd"))
register(ScheduleFreeAdamW, "Schedule-Free AdamW (Defazio et al., 2024); call opt.train()/opt.eval()",
         name="schedule_free_adamw", aliases=("adamwschedulefree", "schedulefreeadamw"))
