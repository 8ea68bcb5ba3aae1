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
from .fused import run_generated
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
    fused=boolean,
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
        """The eager update. By default: ``kernel`` with the ``scalars`` of each tensor's step."""
        if not self.has_kernel():
            raise NotImplementedError(f"{type(self).__name__} defines neither update() nor kernel()")
        self.kernel(group, p, g, s, self._expand_scalars(group, t))

    def scalars(self, group: dict[str, Any], t: float) -> dict[str, float]:
        """Per-step numbers the kernel needs (bias corrections, the step size, ...), computed
        in Python from the step count ``t``. Anything that changes during training (``lr``)
        must reach the kernel through here, never as ``group["lr"]``."""
        return {}

    @staticmethod
    def kernel(group: dict[str, Any], p: TensorList, g: TensorList, s: dict[str, TensorList],
               c: dict[str, Any]) -> None:
        """The elementwise update, written with TensorList methods only: it runs foreach in
        eager mode (``c`` values are numbers or per-tensor lists) and as one generated kernel
        with ``fused=True`` (``c`` values are 0-d tensors). ``group`` values are constants."""
        raise NotImplementedError

    @classmethod
    def has_kernel(cls) -> bool:
        return cls.kernel is not Optimizer.kernel

    def transform_grads(self, group: dict[str, Any], g: TensorList) -> TensorList:
        """Reshape the raw gradients before maximize and weight decay (e.g. centralization).
        Never change ``g`` in place; returned tensors may alias it. Runs in both paths."""
        return g

    def native_fused(self, group: dict[str, Any]) -> bool:
        """Whether ``fused_update`` (a hand-written kernel, e.g. torch's own) serves this group."""
        return False

    def fused_update(self, group: dict[str, Any], p: TensorList, g: TensorList,
                     s: dict[str, TensorList], steps: list[Tensor]) -> None:
        """The hand-written fused step: called after ``steps`` were incremented; handles
        maximize and weight decay itself."""
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
        if values.get("fused") and not (self.has_kernel() or self.native_fused(values)):
            raise ValueError(f"invalid fused=True: {type(self).__name__} has no fused path "
                             "(it defines update(), not scalars() + kernel())")

    def _expand_scalars(self, group: dict[str, Any], t: list[float]) -> dict[str, Any]:
        """``scalars`` for each tensor: plain numbers when all steps agree (the usual case)."""
        distinct = set(t)
        if len(distinct) == 1:
            return {k: float(v) for k, v in self.scalars(group, t[0]).items()}  # float(): tensor lr
        per_step = {k: {n: float(v) for n, v in self.scalars(group, k).items()} for k in distinct}
        return {name: [per_step[k][name] for k in t] for name in per_step[t[0]]}

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
        checked = self._constraints()
        for group in self.param_groups:
            for name, value in self.defaults.items():
                if name in checked:   # not torch's own additions such as "differentiable"
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
            for b in self._buckets(group):
                if group.get("fused") and self._fused_step(group, b):
                    continue
                torch._foreach_add_(b.steps, 1.0)
                t = [x.item() for x in b.steps]
                g, owned = self.transform_grads(group, b.g), False   # may alias p.grad
                if group["maximize"]:
                    g, owned = g.neg(), True
                g = apply_weight_decay(group["weight_decay_mode"], group["weight_decay"], b.p, g,
                                       self.decay_lr(group, t), owned)
                self.update(group, b.p, g, b.s, t)
        return loss

    def _buckets(self, group: dict[str, Any]) -> list[Bucket]:
        """The params of a group that have gradients, bucketed by (device, dtype)."""
        names = self.state_names_for(group)
        fused = bool(group.get("fused"))
        buckets: dict[tuple, Bucket] = {}
        for param in group["params"]:
            grad = param.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            if param.is_complex() and not self.supports_complex:
                raise ValueError(f"{type(self).__name__} does not support complex parameters "
                                 f"(got one of dtype {param.dtype})")
            state = self.state[param]
            if "step" not in state:
                # torch's convention: fused steps live on the parameter's device, in float32
                state["step"] = (torch.tensor(0.0, dtype=torch.float32, device=param.device) if fused
                                 else torch.tensor(0.0, dtype=_step_dtype()))
            for name in names:
                if name not in state:
                    state[name] = self.init_state(group, param, name)
            tensors = [param, grad] + [state[name] for name in names]
            is_complex = param.is_complex()
            if is_complex:
                tensors = [torch.view_as_real(x) if x.is_complex() else x for x in tensors]
            key = (param.device, param.dtype)
            b = buckets.get(key)
            if b is None:
                b = buckets[key] = Bucket(key, names)
            b.p.append(tensors[0])
            b.g.append(tensors[1])
            for name, x in zip(names, tensors[2:]):
                b.s[name].append(x)
            b.steps.append(state["step"])
            b.params.append(param)
            b.states.append(state)
            b.is_complex |= is_complex
        return list(buckets.values())

    def _fused_step(self, group: dict[str, Any], b: Bucket) -> bool:
        """Run a bucket's step fused; False where the eager path must run it instead."""
        if self.native_fused(group):
            torch._foreach_add_(b.steps, 1.0)
            self.fused_update(group, b.p, b.g, b.s, b.steps)
            return True
        if not self.has_kernel() or b.is_complex or not all(p.is_contiguous() for p in b.params):
            return False
        if len(b.params) != sum(1 for p in group["params"] if (p.device, p.dtype) == b.key):
            return False  # some params have no grad this step: the flat kernel would move them
        return run_generated(self, group, b)


class Bucket:
    """One (device, dtype) of a param group: TensorLists for the update, and what made them."""

    __slots__ = ("key", "p", "g", "s", "steps", "params", "states", "is_complex")

    def __init__(self, key: tuple, names: tuple[str, ...]) -> None:
        self.key = key
        self.p, self.g = TensorList(), TensorList()
        self.s = {n: TensorList() for n in names}
        self.steps: list[Tensor] = []
        self.params: list[Tensor] = []          # the parameters themselves (not real views)
        self.states: list[dict[str, Any]] = []
        self.is_complex = False
