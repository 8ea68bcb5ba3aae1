"""The optforge base optimizer.

An optimizer declares its hyperparameters (an explicit ``__init__`` signature passing a
``defaults`` dict), a constraint for each, its state tensors, and ONE ``update`` over the
tensor lists of a (device, dtype) bucket. The base does the rest once for every optimizer:
validation, param groups, state creation, closure, ``maximize``, weight decay, sparse and
complex gradients, grouping by device/dtype, and torch-format ``state_dict``.

A complete optimizer::

    class MomentumSGD(Optimizer):
        constraints = dict(lr=non_negative, momentum=unit_interval)
        state_names = ("velocity",)

        def __init__(self, params, lr=0.01, momentum=0.9, weight_decay=0.0, *,
                     weight_decay_mode="coupled", maximize=False):
            super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                          weight_decay_mode=weight_decay_mode, maximize=maximize))

        def update(self, group, p, g, s, t):
            dw = s["velocity"]
            dw.mul_(group["momentum"]).add_(g, alpha=-group["lr"])   # dw <- momentum dw - lr g
            p.add_(dw)                                                # w  <- w + dw
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from .constraints import Constraint, boolean, non_negative, one_of
from .tensorlist import TensorList
from .weight_decay import WEIGHT_DECAY_MODES, apply_weight_decay

__all__ = ["Optimizer", "ParamsT"]

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]]

# Keys other libraries and torch itself put in param groups; accepted alongside hyperparameters.
GROUP_METADATA = frozenset({"params", "param_names", "name", "initial_lr", "lr_scale", "layer_id"})

COMMON_CONSTRAINTS: dict[str, Constraint] = dict(
    lr=non_negative,
    weight_decay=non_negative,
    weight_decay_mode=one_of(*WEIGHT_DECAY_MODES),
    maximize=boolean,
)


def _step_dtype() -> torch.dtype:
    # torch.optim's convention, so state dicts move between torch and optforge unchanged.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class Optimizer(torch.optim.Optimizer):
    """Base class of every optforge optimizer (a ``torch.optim.Optimizer``).

    Subclasses set:

    - ``constraints``: hyperparameter name -> check (see :mod:`optforge.constraints`); every
      hyperparameter must have one. ``lr``, ``weight_decay``, ``weight_decay_mode`` and
      ``maximize`` are checked by default.
    - ``state_names``: per-parameter state tensors (torch's names), created by ``init_state``
      (zeros like the parameter unless overridden). ``step`` is kept by the base.
    - ``update(group, p, g, s, t)``: the algorithm, over :class:`TensorList` s of one
      (device, dtype) bucket. ``g`` is read-only (it may be the user's ``p.grad``); ``s`` maps a
      state name to its list; ``t`` is the list of step counts (1 on the first step).
    """

    constraints: ClassVar[dict[str, Constraint]] = {}
    state_names: ClassVar[tuple[str, ...]] = ()
    #: Complex parameters are optimized as ``torch.view_as_real`` pairs (as torch.optim does).
    #: An optimizer whose update is not elementwise sets this to False to refuse them.
    supports_complex: ClassVar[bool] = True

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        checks = self._constraints()
        unchecked = sorted(set(defaults) - set(checks))
        if unchecked:
            raise TypeError(f"{type(self).__name__} declares no constraint for {unchecked}")
        self._check_hyperparameters(defaults)
        super().__init__(params, defaults)

    # ---- hooks for subclasses -------------------------------------------------------------
    def update(self, group: dict[str, Any], p: TensorList, g: TensorList,
               s: dict[str, TensorList], t: list[float]) -> None:
        raise NotImplementedError

    def check_group(self, group: dict[str, Any]) -> None:
        """Checks that span several hyperparameters (raise ValueError). Per-value checks go in
        ``constraints``."""

    def state_names_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The state tensors a group needs (override when an option adds one, e.g. amsgrad)."""
        return self.state_names

    def init_state(self, group: dict[str, Any], p: Tensor, name: str) -> Tensor:
        return torch.zeros_like(p, memory_format=torch.preserve_format)

    def decay_lr(self, group: dict[str, Any], t: list[float]) -> float | list[float]:
        """The lr that scales decoupled weight decay (one number, or one per tensor)."""
        return group["lr"]

    # ---- validation -----------------------------------------------------------------------
    @classmethod
    def _constraints(cls) -> dict[str, Constraint]:
        return {**COMMON_CONSTRAINTS, **cls.constraints}

    def _check_hyperparameters(self, values: dict[str, Any]) -> None:
        checks = self._constraints()
        for name, value in values.items():
            if name in checks:
                checks[name](name, value)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        known = set(self.defaults) | GROUP_METADATA
        for key in param_group:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(self.defaults), n=3)
                hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
                raise ValueError(
                    f"unknown hyperparameter {key!r} in a param group of {type(self).__name__}{hint} "
                    f"(valid: {', '.join(sorted(self.defaults))})"
                )
        merged = {**self.defaults, **param_group}
        self._check_hyperparameters(merged)
        self.check_group(merged)
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Accept checkpoints written by torch.optim or older optforge versions: missing
        # hyperparameters take this optimizer's defaults, integer steps become tensors.
        for group in self.param_groups:
            for name, value in self.defaults.items():
                group.setdefault(name, value)
            for p in group["params"]:
                st = self.state.get(p)
                if st and "step" in st and not torch.is_tensor(st["step"]):
                    st["step"] = torch.tensor(float(st["step"]), dtype=_step_dtype())

    # ---- the step -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; returns the closure's loss (closure run with grad)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p, g, s, steps in self._buckets(group):
                torch._foreach_add_(steps, 1.0)
                t = [x.item() for x in steps]
                owned = False
                if group["maximize"]:
                    g, owned = g.neg(), True
                g = apply_weight_decay(group["weight_decay_mode"], group["weight_decay"], p, g,
                                       self.decay_lr(group, t), owned)
                self.update(group, p, g, s, t)
        return loss

    def _buckets(self, group: dict[str, Any]):
        """Yield (params, grads, state lists, step tensors) per (device, dtype) of a group."""
        names = self.state_names_for(group)
        buckets: dict[tuple, tuple[TensorList, TensorList, dict[str, TensorList], list[Tensor]]] = {}
        for param in group["params"]:
            grad = param.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            state = self.state[param]
            if "step" not in state:
                state["step"] = torch.tensor(0.0, dtype=_step_dtype())
            for name in names:
                if name not in state:
                    state[name] = self.init_state(group, param, name)
            tensors = [param, grad] + [state[name] for name in names]
            if param.is_complex():
                if not self.supports_complex:
                    raise ValueError(f"{type(self).__name__} does not support complex parameters "
                                     f"(got one of dtype {param.dtype})")
                tensors = [torch.view_as_real(x) if x.is_complex() else x for x in tensors]
            key = (param.device, param.dtype)
            if key not in buckets:
                buckets[key] = (TensorList(), TensorList(), {n: TensorList() for n in names}, [])
            p, g, s, steps = buckets[key]
            p.append(tensors[0])
            g.append(tensors[1])
            for name, x in zip(names, tensors[2:]):
                s[name].append(x)
            steps.append(state["step"])
        return buckets.values()
