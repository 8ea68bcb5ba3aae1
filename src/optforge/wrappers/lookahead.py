r"""Lookahead (Zhang, Lucas, Hinton & Ba, 2019): "k steps forward, 1 step back"."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..constraints import integer_at_least
from ..distributed import check_same_layout, local
from .base import OptimizerWrapper

__all__ = ["Lookahead"]

SLOW = "lookahead_slow"      # the slow weights' key in each parameter's saved state
K, ALPHA, STEP = "lookahead_k", "lookahead_alpha", "lookahead_step"   # param-group keys


def check_k(name: str, value: Any) -> None:
    integer_at_least(1)(name, value)


def check_alpha(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"invalid {name}={value!r}: expected a real number in [0, 1]")


class Lookahead(OptimizerWrapper):
    r"""Lookahead around any optimizer (Zhang et al., 2019, Algorithm 1).

    The base optimizer takes the fast steps; every :math:`k` of them the slow weights
    :math:`\phi` move a fraction :math:`\alpha` towards the fast weights :math:`\theta` and
    the fast weights restart from there:

    .. math::
        \theta_{t,i} &= \theta_{t,i-1} + A(L, \theta_{t,i-1}, d)
            \quad i = 1, \dots, k \qquad \text{(the base optimizer's steps)} \\
        \phi_t &= \phi_{t-1} + \alpha\,(\theta_{t,k} - \phi_{t-1}) \\
        \theta_{t+1,0} &= \phi_t

    The base optimizer's state (momentum, second moments) carries on across the reset, as in
    the paper. ``opt = Lookahead(optforge.AdamW(params), k=5, alpha=0.5)`` then use ``opt``
    as any optimizer; an lr scheduler built on it drives the base's lr (the param groups are
    the base's own list).

    - ``k``: fast steps per slow step (an int >= 1); ``alpha``: slow step size in [0, 1]
      (1: plain base optimizer; 0: the weights never leave :math:`\phi_0`).
    - Both live in each param group (``lookahead_k``, ``lookahead_alpha``) beside the step
      counter ``lookahead_step``, so a group may have its own, and ``state_dict`` carries
      them. Each group counts its own steps: a group added with ``add_param_group`` starts a
      full cycle of ``k`` steps at its first step.
    - Slow weights are taken lazily, just before the first fast step, from every parameter
      that requires grad (so weights loaded into the model after building the optimizer are
      the ones :math:`\phi_0` starts from). They have the parameter's dtype and device and
      are kept in :attr:`slow_weights` (``opt.state`` is the base's state).
    - A parameter without a gradient at a slow step (frozen with ``requires_grad_(False)``,
      or unused in that step) is not being trained: the base optimizer did not step it, and
      the slow step leaves it as it is too, where the paper interpolates every weight. Its
      slow weights are dropped; if it is trained again they are taken anew from its value
      then, as :math:`\phi_0` is.
    - DTensor parameters (FSDP2, tensor parallel): the slow weights are DTensors sharded as
      their parameters, and the slow step, being elementwise, runs on the local shards.
    - A step the base skipped (optforge's ``skip_nonfinite`` counted it in ``skipped_steps``)
      is not counted. Under ``GradScaler``, ``scaler.step(opt)`` skips the whole step.

    **state_dict.** One torch-format dict: the base's, with each parameter's slow weights
    added to its state entry as ``"lookahead_slow"`` and the counters, ``k`` and ``alpha`` in
    the param groups (so ``optforge.state_dict_by_name`` keeps them too). Loading casts the
    slow weights to each parameter's device and dtype, as torch does for optimizer state,
    and restores ``k``, ``alpha`` and the counters (saved hyperparameters win, as for lr).
    A state dict saved by the bare base optimizer also loads: the base state is restored
    and Lookahead starts over (counters at 0, slow weights from the parameters at the next
    step); a parameter whose entry has no slow weights likewise takes them at the next step.
    """

    def __init__(self, base_optimizer: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5) -> None:
        check_k("k", k)
        check_alpha("alpha", alpha)
        super().__init__(base_optimizer)
        self.k, self.alpha = k, alpha
        #: parameter -> its slow weights :math:`\phi`
        self.slow_weights: dict[Tensor, Tensor] = {}
        for group in self.param_groups:
            self._init_group(group)

    def wrapper_options(self) -> dict[str, Any]:
        return {"k": self.k, "alpha": self.alpha}

    def _init_group(self, group: dict[str, Any]) -> None:
        group.setdefault(K, self.k)
        group.setdefault(ALPHA, self.alpha)
        group.setdefault(STEP, 0)
        check_k(K, group[K])
        check_alpha(ALPHA, group[ALPHA])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """The base's ``add_param_group``; ``lookahead_k`` / ``lookahead_alpha`` in the dict
        give the new group its own (default: the wrapper's ``k`` / ``alpha``)."""
        ours = {key: param_group[key] for key in (K, ALPHA) if key in param_group}
        for key, value in ours.items():
            (check_k if key == K else check_alpha)(key, value)
        self.base_optimizer.add_param_group({key: v for key, v in param_group.items() if key not in ours})
        group = self.param_groups[-1]
        group.update(ours)
        self._init_group(group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One fast step of the base optimizer; every ``k``-th, the slow step."""
        self._take_slow_weights()
        skipped = getattr(self.base_optimizer, "skipped_steps", None)
        loss = self.base_optimizer.step() if closure is None else self.base_optimizer.step(closure)
        if skipped is not None and self.base_optimizer.skipped_steps != skipped:
            return loss                     # the base changed nothing: neither does Lookahead
        for group in self.param_groups:
            if STEP not in group:           # added with base_optimizer.add_param_group directly
                self._init_group(group)
            group[STEP] += 1
            if group[STEP] % group[K] == 0:
                self._slow_step(group)
        return loss

    def _take_slow_weights(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad and p not in self.slow_weights:
                    self.slow_weights[p] = p.detach().clone(memory_format=torch.preserve_format)  # phi_0

    def _slow_step(self, group: dict[str, Any]) -> None:
        buckets: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
        for p in group["params"]:
            slow = self.slow_weights.get(p)
            if slow is not None and p.grad is None:
                # Not trained now (frozen, or unused this step): the base left it alone, so does
                # Lookahead; were it trained again, its slow weights restart from it then.
                del self.slow_weights[p]
            elif slow is not None:
                check_same_layout(p, slow)
                p, slow = local(p), local(slow)      # elementwise: on DTensors, their local shards
                if p.is_complex():   # as (re, im) pairs, as the base optimizers step them
                    p, slow = torch.view_as_real(p), torch.view_as_real(slow)
                fast, slows = buckets.setdefault((p.device, p.dtype), ([], []))
                fast.append(p)
                slows.append(slow)
        for fast, slow in buckets.values():
            torch._foreach_sub_(fast, slow)                        # theta - phi (theta is reset below)
            torch._foreach_add_(slow, fast, alpha=group[ALPHA])    # phi <- phi + alpha (theta - phi)
            torch._foreach_copy_(fast, slow)                       # theta <- phi

    # ---- state_dict ---------------------------------------------------------------------------
    def _indexed_params(self) -> dict[int, Tensor]:
        """torch's numbering of the parameters in a state dict (in group order, first seen)."""
        index: dict[int, Tensor] = {}
        seen: set[int] = set()
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    index[len(index)] = p
        return index

    def state_dict(self) -> dict[str, Any]:
        def build() -> dict[str, Any]:
            state_dict = self.base_optimizer.state_dict()
            state = dict(state_dict["state"])    # its entries are the base's live dicts: never mutate
            for i, p in self._indexed_params().items():
                slow = self.slow_weights.get(p)
                if slow is not None:
                    state[i] = {**state.get(i, {}), SLOW: slow}
            return {**state_dict, "state": state}

        return self._state_dict_with_hooks(build)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._load_state_dict_with_hooks(state_dict, self._load)

    def _load(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or "state" not in state_dict:
            raise ValueError("expected a dict with 'state' and 'param_groups', as optimizer.state_dict() "
                             "returns")
        saved_slow, base_state = {}, {}
        for i, entry in state_dict["state"].items():
            entry = dict(entry)
            if SLOW in entry:
                saved_slow[i] = entry.pop(SLOW)
            if entry:
                base_state[i] = entry
        # Saved parameter i is ours at the same position (the base checks the counts match).
        saved_ids = [i for g in state_dict.get("param_groups", []) for i in g["params"]]
        param_of = dict(zip(saved_ids, (p for g in self.param_groups for p in g["params"])))
        for i, slow in saved_slow.items():
            p = param_of.get(i)
            if p is not None and tuple(slow.shape) != tuple(p.shape):
                raise ValueError(f"the loaded {SLOW!r} of parameter {i} has shape {tuple(slow.shape)}, "
                                 f"the parameter has shape {tuple(p.shape)}")
        self.base_optimizer.load_state_dict({**state_dict, "state": base_state})
        for group in self.param_groups:   # new dicts from the base: the saved ones, or fresh
            self._init_group(group)
        self.slow_weights = {}
        for i, slow in saved_slow.items():
            p = param_of.get(i)
            if p is not None:
                # Like torch's optimizer state: the parameter's device, and its dtype if floating.
                dtype = p.dtype if p.is_floating_point() else slow.dtype
                self.slow_weights[p] = slow.to(device=p.device, dtype=dtype, copy=True)
