"""The optforge base optimizer.

An optimizer declares its hyperparameters (an explicit ``__init__`` signature passing a
``defaults`` dict), a constraint for each, its state tensors, and ONE ``update`` over the
tensor lists of a (device, dtype) bucket. The base does the rest once for every optimizer:
validation, param groups, state creation, closure, ``maximize``, weight decay, complex
parameters, the refusal of sparse gradients (``supports_sparse`` opts out), grouping by
device/dtype, torch-format ``state_dict``, and torch.optim's flags (:mod:`optforge.torch_compat`).

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
import math
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from . import amp, eager_chunks, lowbit, paths, step_plan
from .constraints import Constraint, boolean, non_negative, one_of, tensor_or
from .distributed import check_supported, is_dtensor, local_shards
from .distributed_matrix import check_layout
from .fused import run_generated
from .param_groups import check_unique_params
from .precision import (
    LOW_PRECISION,
    check_low_precision,
    computes_in_float32,
    float32_copies,
    restore_float32_state,
    write_back,
)
from .steps import advance_steps
from .tensorlist import TensorList
from .torch_compat import (
    FLAG_CONSTRAINTS,
    TORCH_FLAGS,
    adopt_saved_group,
    check_flags,
    complete_loaded_state,
    numbers_for_step,
    resolve_decay_flag,
)
from .weight_decay import WEIGHT_DECAY_MODES, apply_weight_decay

__all__ = ["Optimizer", "ParamsT"]

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]]

# Keys other libraries and torch itself put in param groups; accepted alongside hyperparameters.
GROUP_METADATA = frozenset({"params", "param_names", "name", "initial_lr", "lr_scale", "layer_id"})

COMMON_CONSTRAINTS: dict[str, Constraint] = dict(
    lr=tensor_or(non_negative),
    weight_decay=tensor_or(non_negative),
    weight_decay_mode=one_of(*WEIGHT_DECAY_MODES),
    maximize=boolean,
    **FLAG_CONSTRAINTS,        # torch.optim's foreach, fused, capturable, ... (optforge.torch_compat)
)

#: Options every optforge optimizer has, off by default, that are not part of any algorithm:
#: the base adds them to ``defaults`` (so every param group carries them, they are checked,
#: saved in ``state_dict`` and may differ per group). Set them with :meth:`Optimizer.configure`
#: or in a param-group dict. See docs/reliability.md and docs/memory.md.
_BASE_FLAGS: dict[str, bool] = dict(
    skip_nonfinite=False,        # a step with an inf/NaN gradient changes nothing (counted)
    fp32_state=False,            # bf16/fp16 params: float32 state, update computed in float32
    stochastic_rounding=False,   # bf16 params: update computed in float32, stochastically rounded
)
BASE_OPTIONS: dict[str, Any] = {**_BASE_FLAGS, **lowbit.OPTIONS}   # + state_precision (optforge.lowbit)
BASE_OPTION_CONSTRAINTS: dict[str, Constraint] = {**{name: boolean for name in _BASE_FLAGS},
                                                  **lowbit.OPTION_CONSTRAINTS}

_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)

Entry = tuple[Tensor, Tensor, dict[str, Any] | None]   # (param, grad, state; None before its first step)


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
    - ``state_kinds``: for low-bit state (``state_precision``), which states are
      non-negative, sign-only, slow averages or kept in full precision (others are signed).
    - ``update(group, p, g, s, t)``: the algorithm, over :class:`TensorList` s of one
      (device, dtype) bucket. ``g`` is read-only (it may be the user's ``p.grad``); ``s`` maps a
      state name to its list; ``t`` is the list of step counts (1 on the first step).
    """

    constraints: ClassVar[dict[str, Constraint]] = {}
    state_names: ClassVar[tuple[str, ...]] = ()
    #: How ``state_precision`` may store each state (see :mod:`optforge.lowbit`): "signed"
    #: (the default), "non_negative", "sign" (only its sign matters), "slow" (a signed average
    #: with beta near 1: int8 under int4) or "full" (never lowered).
    state_kinds: ClassVar[dict[str, str]] = {}
    #: Complex parameters are optimized as ``torch.view_as_real`` pairs (as torch.optim does).
    #: An optimizer whose update is not elementwise sets this to False to refuse them.
    supports_complex: ClassVar[bool] = True
    #: Sparse gradients (``nn.Embedding(sparse=True)``) reach ``update`` as they are (buckets
    #: holding one run eagerly); an optimizer whose update handles them sets this to True.
    supports_sparse: ClassVar[bool] = False
    #: DTensor parameters (FSDP2, tensor parallel) of an optimizer the registry marks
    #: ``elementwise=False``: True where every whole-tensor quantity of its update (norms, row
    #: and column statistics, sums over a group) is computed over every shard, through
    #: ``TensorList.norm`` and :mod:`optforge.distributed`'s reductions; False refuses them.
    shard_reductions: ClassVar[bool] = False
    #: The update needs whole matrices and gets them through :func:`optforge.distributed_matrix.
    #: map_matrices` (owner compute), so DTensor parameters are supported although the registry
    #: marks it ``elementwise=False``. ``owner_state``: its state kept whole by each matrix's owner.
    whole_matrices: ClassVar[bool] = False
    owner_state: ClassVar[tuple[str, ...]] = ()
    #: ``update`` (not written as ``kernel``) is elementwise: it gives the same numbers on any
    #: split of the bucket's tensors, so large CPU buckets run it over cache-sized chunks
    #: (:mod:`optforge.eager_chunks`), as they run every ``kernel``.
    elementwise_update: ClassVar[bool] = False
    #: Why ``fused=True`` is refused, in terms of the algorithm (an optimizer that writes
    #: ``update()`` rather than ``scalars()`` + ``kernel()`` has no fused path).
    no_fused_reason: ClassVar[str] = "its update is not written as scalars() + kernel()"

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        checks = self._constraints()
        unchecked = sorted(set(defaults) - set(checks))
        if unchecked:
            raise TypeError(f"{type(self).__name__} declares no constraint for {unchecked}")
        clash = sorted(set(defaults) & set(BASE_OPTIONS))
        if clash:
            raise TypeError(f"{type(self).__name__} declares {clash}, which the base class owns")
        resolve_decay_flag(defaults)
        self._check_hyperparameters(defaults)
        #: steps skipped by ``skip_nonfinite`` (in this process: not saved in ``state_dict``)
        self.skipped_steps = 0
        super().__init__(params, {**defaults, **BASE_OPTIONS})

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

    def kernel_constants(self, group: dict[str, Any]) -> dict[str, Any]:
        """The group values a generated kernel may bake in: the hyperparameters, less ``lr``
        (it changes every step: it reaches the kernel through ``scalars``) and the base's
        options, which are handled outside the kernel."""
        return {k: group[k] for k in self.defaults
                if k in group and k != "lr" and k not in TORCH_FLAGS and k not in BASE_OPTIONS}

    def transform_grads(self, group: dict[str, Any], g: TensorList) -> TensorList:
        """Reshape the raw gradients before maximize and weight decay (e.g. centralization).
        Never change ``g`` in place; returned tensors may alias it. Runs in both paths."""
        return g

    def native_fused(self, group: dict[str, Any]) -> bool:
        """Whether ``fused_update`` (a hand-written kernel, e.g. torch's own) serves this group."""
        return False

    def fused_update(self, group: dict[str, Any], p: TensorList, g: TensorList,
                     s: dict[str, TensorList], steps: list[Tensor], grad_scale: Tensor | None = None,
                     found_inf: Tensor | None = None) -> None:
        """The hand-written fused step: called after ``steps`` were incremented; handles
        maximize and weight decay itself, and ``torch.amp.GradScaler``'s scale and inf flag
        (:mod:`optforge.amp`): the gradients divided by ``grad_scale``, nothing updated where
        ``found_inf`` is nonzero."""
        raise NotImplementedError

    @property
    def _step_supports_amp_scaling(self) -> bool:
        # read by torch.amp.GradScaler: it then hands the step its scale and inf flag
        return amp.supports_scaling(self)

    def check_group(self, group: dict[str, Any]) -> None:
        """Checks that span several hyperparameters (raise ValueError). Per-value checks go in
        ``constraints``."""

    def check_dtype(self, group: dict[str, Any], dtype: torch.dtype) -> None:
        """Checks of a group's hyperparameters against a dtype its params have (raise
        ValueError), run before a step changes anything."""

    def state_names_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The state tensors a group needs (override when an option adds one, e.g. amsgrad)."""
        return self.state_names

    def _per_param_state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        """``state_names_for``, less ``owner_state`` for DTensor params: each matrix's owner
        keeps that state whole (optforge.distributed_matrix), no rank keeps it per shard."""
        names = self.state_names_for(group)
        if self.owner_state and any(is_dtensor(p) for p in group["params"]):
            return tuple(n for n in names if n not in self.owner_state)
        return names

    def init_state(self, group: dict[str, Any], p: Tensor, name: str) -> Tensor:
        return torch.zeros_like(p, memory_format=torch.preserve_format)

    def state_shape(self, group: dict[str, Any], p: Tensor, name: str) -> tuple[int, ...] | None:
        """The shape ``load_state_dict`` expects of state ``name`` (None: not checked). The
        parameter's, unless ``init_state`` is overridden (factored state has other shapes)."""
        return tuple(p.shape) if type(self).init_state is Optimizer.init_state else None

    def decay_lr(self, group: dict[str, Any], t: list[float]) -> float | list[float]:
        """The lr that scales decoupled weight decay (one number, or one per tensor)."""
        return group["lr"]

    # ---- validation -----------------------------------------------------------------------
    @classmethod
    def _constraints(cls) -> dict[str, Constraint]:
        return {**COMMON_CONSTRAINTS, **BASE_OPTION_CONSTRAINTS, **cls.constraints}

    def _check_hyperparameters(self, values: dict[str, Any]) -> None:
        checks = self._constraints()
        for name, value in values.items():
            if name in checks:
                checks[name](name, value)
        check_flags(type(self).__name__, values)
        if values.get("fused") and not (self.has_kernel() or self.native_fused(values)):
            raise ValueError(f"invalid fused=True: {type(self).__name__} has no fused path: "
                             f"{self.no_fused_reason}; use fused=False")
        lowbit.check_supported(type(self), values)

    def _expand_scalars(self, group: dict[str, Any], t: list[float]) -> dict[str, Any]:
        """``scalars`` for each tensor: plain numbers when all steps agree (the usual case)."""
        distinct = set(t)
        if len(distinct) == 1:
            return {k: float(v) for k, v in self.scalars(group, t[0]).items()}  # float(): tensor lr
        per_step = {k: {n: float(v) for n, v in self.scalars(group, k).items()} for k in distinct}
        return {name: [per_step[k][name] for k in t] for name in per_step[t[0]]}

    def configure(self, *, skip_nonfinite: bool | None = None, fp32_state: bool | None = None,
                  stochastic_rounding: bool | None = None, state_precision: Any = ...,
                  min_quantized_size: int | None = None) -> Optimizer:
        """Turn the base options on or off for every param group (and groups added later);
        returns the optimizer, so ``opt = AdamW(params).configure(skip_nonfinite=True)``.

        - ``skip_nonfinite``: before updating anything, check the gradients of the groups that
          have it; if one holds an inf or NaN, the whole step is skipped (no parameter, state
          entry or step count changes) and ``self.skipped_steps`` is incremented. Off (the
          default), a non-finite gradient propagates into the parameters, as in torch.optim.
        - ``fp32_state``: bfloat16/float16 parameters keep their state in float32 (state that
          exists is converted now), and their update (weight decay included) is computed in
          float32 and rounded once, to nearest, into the parameter.
        - ``stochastic_rounding``: bfloat16 parameters get their update computed in float32 and
          written back with stochastic rounding (unbiased: updates smaller than half a bf16 ulp
          survive in expectation instead of being rounded away). Uses torch's default RNG.

        - ``state_precision``: ``"bf16"``, ``"int8"``, ``"int4"`` or ``"fp8"`` stores the state
          of tensors with at least ``min_quantized_size`` entries (default 4096) in fewer bits;
          ``None`` is full precision. State that exists is converted now (docs/memory.md).

        Buckets that use ``fp32_state`` or ``stochastic_rounding`` run the eager path even
        with ``fused=True``. Options can also be set per group (``{"params": ..., "fp32_state":
        True}``); ``None`` leaves an option as it is (``...`` for ``state_precision``, whose
        ``None`` turns it off).
        """
        given = {k: v for k, v in dict(skip_nonfinite=skip_nonfinite, fp32_state=fp32_state,
                                       stochastic_rounding=stochastic_rounding,
                                       min_quantized_size=min_quantized_size).items() if v is not None}
        if state_precision is not ...:
            given["state_precision"] = state_precision
        for name, value in given.items():
            BASE_OPTION_CONSTRAINTS[name](name, value)
        lowbit.check_configure(self, given)
        self.defaults.update(given)
        for group in self.param_groups:
            group.update(given)
            if given.get("fp32_state"):            # state that exists already goes float32 now
                for p in group["params"]:
                    st = self.state.get(p, {})
                    for name, x in st.items():
                        if name != "step" and torch.is_tensor(x) and x.dtype in LOW_PRECISION:
                            st[name] = x.float()
        if given.keys() & lowbit.OPTIONS.keys():
            lowbit.convert_state(self)
        step_plan.forget(self)
        return self

    def state_dict(self) -> dict[str, Any]:
        """torch's ``state_dict``; low-bit state entries are dicts of codes and scales."""
        return lowbit.export_state(super().state_dict())

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "skipped_steps": self.skipped_steps}

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
        resolve_decay_flag(param_group, self.defaults)
        merged = {**self.defaults, **param_group}
        self._check_hyperparameters(merged)
        self.check_group(merged)
        check_unique_params(param_group, self.param_groups)
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, after checks whose errors say what does not match: the
        number of param groups, of params in each, and each param's state (the tensors the
        saved hyperparameters need, with the param's shape). State that bf16/fp16 params keep
        in float32 stays float32 (torch would cast it to the param's dtype): see
        :func:`optforge.precision.restore_float32_state`. ``state_precision`` and
        ``min_quantized_size`` stay this optimizer's: low-bit state loads bit for bit, and is
        encoded or decoded where they differ from the checkpoint's."""
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError("expected a dict with 'state' and 'param_groups', as optimizer.state_dict() "
                             "returns")
        if str(state_dict.get("format", "")).startswith("optforge.state_by_name"):
            raise ValueError("this state dict is keyed by parameter name (state_dict_by_name): load it "
                             "with optforge.load_state_dict_by_name")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"the loaded state dict has {len(saved_groups)} param group(s), this "
                             f"{type(self).__name__} has {len(self.param_groups)}")
        where: dict[Any, tuple[Tensor, dict[str, Any]]] = {}
        for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"param group {i}: the loaded state dict has {len(saved['params'])} "
                                 f"parameter(s), this optimizer's group has {len(group['params'])}")
            hyperparameters = {k: v for k, v in saved.items() if k != "params" and k not in lowbit.OPTIONS}
            adopt_saved_group(hyperparameters, self.defaults)     # torch.optim's decay flag
            merged = {**group, **hyperparameters}
            self._check_hyperparameters(merged)
            where.update((k, (p, merged)) for k, p in zip(saved["params"], group["params"]))
        for k, st in state_dict["state"].items():
            if k not in where or not st:
                continue
            p, group = where[k]
            names = self._per_param_state_names(group)
            # entries that hold nothing (an unused factored entry) are created at the next step
            lacking = [n for n in names
                       if st.get(n) is None and not _is_empty(self.state_shape(group, p, n))]
            if lacking:
                raise ValueError(f"the loaded state of parameter {k} (shape {tuple(p.shape)}) lacks "
                                 f"{lacking} (it has {sorted(st)}): was it saved by another optimizer, "
                                 f"or with other options, than this {type(self).__name__}?")
            for n in names:
                x, shape = st.get(n), self.state_shape(group, p, n)
                if shape is not None and torch.is_tensor(x) and tuple(x.shape) != shape:
                    raise ValueError(f"the loaded state {n!r} of parameter {k} has shape "
                                     f"{tuple(x.shape)}, expected {shape} (the parameter has shape "
                                     f"{tuple(p.shape)})")
        low_bit = lowbit.plan_load(self, state_dict, where)     # torch would cast codes to floats
        step_plan.forget(self)
        kept = [{k: group[k] for k in lowbit.OPTIONS} for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, options in zip(self.param_groups, kept):    # memory layout is this process's choice
            group.update(options)
        for p, entries in low_bit.items():
            self.state[p].update(entries)
        for k, st in state_dict["state"].items():
            if k in where:
                p, group = where[k]
                restore_float32_state(group, p, st, self.state[p])
                paths.place_loaded_step(self, group, _bucket_key(p), self.state[p])

    def __setstate__(self, state: dict[str, Any]) -> None:
        declared = set(state["defaults"] if "defaults" in state else self.defaults)
        super().__setstate__(state)
        if "differentiable" not in declared:       # torch's base adds it to every optimizer
            self.defaults.pop("differentiable", None)
        self.__dict__.setdefault("skipped_steps", 0)
        # Accept checkpoints written by torch.optim or older optforge versions: missing
        # hyperparameters take this optimizer's defaults, steps are completed (torch_compat).
        checked = self._constraints()
        for group in self.param_groups:
            adopt_saved_group(group, self.defaults)
            for name, value in self.defaults.items():
                if name in checked:
                    group.setdefault(name, value)
            for p in group["params"]:
                st = self.state.get(p)
                if st:
                    complete_loaded_state(st, _step_dtype())

    # ---- the step -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; returns the closure's loss (closure run with grad).

        Under ``torch.compile`` the closure is traced with the caller, and the update runs
        outside the graph (one graph break): it reads step counts on the host, so tracing it
        would specialize on them and recompile every step. ``fused=True`` runs its own compiled
        kernel either way."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():
            self._step_outside_graph()
        else:
            with TensorList.scratch(self):   # big CPU temporaries reuse buffers (optforge.scratch)
                self._step()
        return loss

    def _step(self) -> None:
        if any(group.get("skip_nonfinite") for group in self.param_groups) and not self._grads_finite():
            self.skipped_steps += 1
            return
        # Every check of every group comes first, so a refused step changes nothing at all.
        # A group whose buckets are as last step reuses them (optforge.step_plan).
        plans = step_plan.plan_for(self) if self._plannable() else None
        scaling = amp.handed(self)           # from torch.amp.GradScaler (optforge.amp)
        had_state = len(self.state)          # new state entries come after these
        todo = []
        for group in self.param_groups:
            plan = None if plans is None else plans.get(id(group))
            buckets = None if plan is None else plan.buckets(self, group)
            todo.append((group, buckets, self._entries(group) if buckets is None else None))
        ready = []
        for group, buckets, by_key in todo:
            if buckets is None:
                if not by_key:
                    continue
                buckets = [self._bucket(group, key, entries) for key, entries in by_key.items()]
                if plans is not None:
                    step_plan.remember(self, group, buckets)
            ready.append((group, buckets))
        if scaling is not None:
            scaling = amp.resolve(self, ready, scaling, had_state)
            if scaling is amp.SKIP:
                return
            self._amp_scaling = scaling      # read by _native_step
        try:
            for group, buckets in ready:
                with numbers_for_step(group):    # a tensor lr / weight_decay, as a number
                    self.step_group(group, buckets)
                if plans is not None:
                    step_plan.release(buckets)
        finally:
            if scaling is not None:
                del self._amp_scaling

    @classmethod
    def _plannable(cls) -> bool:
        return cls._entries is Optimizer._entries and cls._bucket is Optimizer._bucket

    def step_group(self, group: dict[str, Any], buckets: list[Bucket]) -> None:
        """One param group's step: each bucket fused, or prepared and updated eagerly.

        An optimizer whose update couples the tensors of a group (Prodigy's D estimate sums over
        all of them) overrides this: ``work = [self.prepare(group, b) for b in buckets]``, its
        update over every ``work`` item, then ``self.finish(group, w)`` for each. One that only
        needs per-bucket bookkeeping first overrides this and calls ``step_bucket``."""
        for b in buckets:
            self.step_bucket(group, b)

    def step_bucket(self, group: dict[str, Any], b: Bucket) -> None:
        """One bucket's step: with low-bit state, fused, or prepared and updated eagerly
        (``fused=None``: torch's fused kernel where it computes the same, :mod:`optforge.paths`)."""
        if group.get("state_precision") and lowbit.holds(b):
            lowbit.step(self, group, b)
            return
        if paths.runs_native(self, group, b):
            self._native_step(group, b)
            return
        if group.get("fused") and not (b.low_precision or b.sparse) and self._fused_step(group, b):
            return
        if eager_chunks.applies(self, group, b):   # large CPU buckets: cache-sized chunks
            eager_chunks.step(self, group, b)
            return
        w = self.prepare(group, b)
        self.update(group, w.p, w.g, w.s, w.t)
        self.finish(group, w)

    def prepare(self, group: dict[str, Any], b: Bucket) -> Work:
        """Advance a bucket's steps and make the gradients the update sees: ``transform_grads``,
        ``maximize``, weight decay. Low-precision buckets (``fp32_state``/``stochastic_rounding``)
        are computed on float32 copies, which ``finish`` writes back."""
        p, g, s, owned = b.p, b.g, b.s, False     # g may alias p.grad: never change it in place
        if b.low_precision:
            p, g, s = float32_copies(group, b)
            owned = True
        t = advance_steps(b.steps)
        g = self.transform_grads(group, g)
        if group["maximize"]:
            g, owned = g.neg(), True
        g = apply_weight_decay(group["weight_decay_mode"], group["weight_decay"], p, g,
                               self.decay_lr(group, t), owned)
        return Work(b, p, g, s, t)

    def finish(self, group: dict[str, Any], w: Work) -> None:
        """Write a low-precision bucket's float32 results back (a no-op otherwise)."""
        if w.bucket.low_precision:
            write_back(group, w.bucket, w.p, w.s)

    _step_outside_graph = torch._disable_dynamo(_step)

    def _grads_finite(self) -> bool:
        """Whether every gradient of the groups with ``skip_nonfinite`` is finite: one max-|g|
        (foreach inf-norm: no overflow, NaN propagates) per (device, dtype), one host sync each.
        DTensor gradients (FSDP2) are checked with DTensor ops, so every rank decides alike."""
        plain: dict[tuple, list[Tensor]] = {}
        distributed: dict[Any, list[Tensor]] = {}
        for group in self.param_groups:
            if not group.get("skip_nonfinite"):
                continue
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    g = g._values()
                if type(g) is not Tensor:
                    distributed.setdefault(getattr(g, "device_mesh", None), []).append(g)
                elif g.numel():
                    plain.setdefault((g.device, g.dtype), []).append(g)
        flags = [torch.stack(torch._foreach_norm(gs, math.inf)).isfinite().all() for gs in plain.values()]
        for gs in distributed.values():
            flag = torch.stack([g.isfinite().all() for g in gs]).all()
            flags.append(flag.full_tensor() if hasattr(flag, "full_tensor") else flag)
        return all(bool(f) for f in flags)

    def _entries(self, group: dict[str, Any]) -> dict[tuple, list[Entry]]:
        """The params of a group that have gradients, by (device, dtype), with their state
        (None before their first step), after every check that can refuse the step: nothing
        is created or changed here."""
        by_key: dict[tuple, list[Entry]] = {}
        state_of = self.state
        for param in group["params"]:
            grad = param.grad
            if grad is None:
                continue
            if grad.is_sparse:
                if not self.supports_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                                       "(of the optforge optimizers, SGD does)")
            state = state_of.get(param)
            if state is None or "step" not in state:
                self._check_new_param(group, param)
            key = _bucket_key(param)
            entries = by_key.get(key)
            if entries is None:
                entries = by_key[key] = []
                check_low_precision(group, key[1])
                self.check_dtype(group, key[1])
            entries.append((param, grad, state))
        return by_key

    def _check_new_param(self, group: dict[str, Any], param: Tensor) -> None:
        if param.is_complex() and not self.supports_complex:
            raise ValueError(f"{type(self).__name__} does not support complex parameters "
                             f"(got one of dtype {param.dtype})")
        if type(param) not in _PLAIN_TENSOR_TYPES:
            self._check_tensor_subclass(group, param)

    def _bucket(self, group: dict[str, Any], key: tuple, entries: list[Entry]) -> Bucket:
        names = self._per_param_state_names(group)
        b = Bucket(key)
        b.params = [e[0] for e in entries]
        b.states = states = [self.state[p] if st is None else st for p, _, st in entries]
        fresh = [st for st in states if "step" not in st]
        if fresh:
            # One tensor holds the new step counts (each state's "step" a 0-d view of it), so
            # advancing a bucket is one add_, not one kernel per parameter. torch's
            # convention: steps its fused kernels read live on the parameter's device, in float32.
            on_device = paths.steps_on_device(self, group, key)
            flat = (torch.zeros(len(fresh), dtype=torch.float32, device=key[0]) if on_device
                    else torch.zeros(len(fresh), dtype=_step_dtype()))
            for i, st in enumerate(fresh):
                st["step"] = flat[i]
        b.steps = [st["step"] for st in states]
        fp32_state = group.get("fp32_state")
        for name in names:
            column = [st.get(name) for st in states]
            if any(x is None for x in column):   # new params, or an option that adds state
                for i, (param, st) in enumerate(zip(b.params, states)):
                    if column[i] is None:
                        x = self.init_state(group, param, name)
                        x = x.float() if fp32_state and x.dtype in LOW_PRECISION else x
                        st[name] = column[i] = lowbit.stored(self, group, param, name, x)
            b.s[name] = TensorList(column)
        b.p = TensorList(b.params)
        b.g = TensorList(e[1] for e in entries)
        b.is_complex = key[1].is_complex
        if b.is_complex:
            b.p, b.g = (TensorList(torch.view_as_real(x) for x in xs) for xs in (b.p, b.g))
            b.s = {n: TensorList(torch.view_as_real(x) if isinstance(x, Tensor) and x.is_complex() else x
                                 for x in xs) for n, xs in b.s.items()}
        b.low_precision = computes_in_float32(group, key[1])
        b.sparse = self.supports_sparse and any(g.is_sparse for g in b.g)
        return b

    def _check_tensor_subclass(self, group: dict[str, Any], param: Tensor) -> None:
        """Refuse DTensor parameters (FSDP2, tensor parallel) where the result would be wrong:
        see :func:`optforge.distributed.check_supported` (and, for whole-matrix optimizers,
        :func:`optforge.distributed_matrix.check_layout`)."""
        if not is_dtensor(param):
            return
        name = type(self).__name__
        lowbit.check_distributed(name, group, param)
        if self.whole_matrices:
            check_layout(name, param, group)
        on_shards = self.shard_reductions or self.whole_matrices
        check_supported(name, _registered_elementwise(type(self)) or on_shards, param, on_shards)

    def _native_step(self, group: dict[str, Any], b: Bucket) -> None:
        """A bucket's step with torch's fused kernel (``fused=True`` DTensors: on their local
        shards; the default path takes plain tensors only)."""
        advance_steps(b.steps, values=False)
        p, g, s = (b.p, b.g, b.s) if group.get("fused") is None else local_shards(b.p, b.g, b.s)
        scaling = getattr(self, "_amp_scaling", None)
        if scaling is None:
            self.fused_update(group, p, g, s, b.steps)
            return
        grad_scale, found_inf = amp.to_device(scaling, b.key[0])
        self.fused_update(group, p, g, s, b.steps, grad_scale=grad_scale, found_inf=found_inf)
        torch._foreach_sub_(b.steps, [found_inf] * len(b.steps))   # a skipped update keeps its count

    def _fused_step(self, group: dict[str, Any], b: Bucket) -> bool:
        """Run a bucket's step with a generated kernel; False where the eager path must run it."""
        if self.native_fused(group) or not self.has_kernel() or b.is_complex:
            return False
        # Frozen params (requires_grad=False, no grad) stay out of the flat buffers for good;
        # a trainable one without a grad this step would make the flat kernel move them.
        if len(b.params) != len(group["params"]) and len(b.params) != sum(
                1 for p in group["params"]
                if _bucket_key(p) == b.key and (p.requires_grad or p.grad is not None)):
            return False
        return run_generated(self, group, b)


def _bucket_key(param: Tensor) -> tuple:
    """Which bucket a parameter's update runs in: its (device, dtype), and a DTensor's mesh
    (DTensor ops refuse operands on different meshes)."""
    if type(param) in _PLAIN_TENSOR_TYPES or not is_dtensor(param):
        return (param.device, param.dtype)
    return (param.device, param.dtype, param.device_mesh)


def _is_empty(shape: tuple[int, ...] | None) -> bool:
    """Whether a state entry of this shape holds nothing (a placeholder, created when absent)."""
    return shape is not None and math.prod(shape) == 0


def _registered_elementwise(cls: type) -> bool:
    """The registry's ``elementwise`` flag of ``cls`` or its nearest registered base (True for
    an optimizer no registry entry describes)."""
    from .registry import list_optimizers

    flags = {info.cls: info.elementwise for info in list_optimizers(with_info=True)}
    for klass in cls.__mro__:
        if klass in flags:
            return flags[klass]
    return True


class Work(NamedTuple):
    """What one bucket's eager update works on (``Optimizer.prepare``): float32 copies of the
    bucket's params and state for low-precision buckets, the bucket's own tensors otherwise."""

    bucket: Bucket
    p: TensorList
    g: TensorList            # after transform_grads, maximize and weight decay
    s: dict[str, TensorList]
    t: list[float]           # step counts, 1 on the first step


class Bucket:
    """One (device, dtype) of a param group: TensorLists for the update, and what made them."""

    __slots__ = ("key", "p", "g", "s", "steps", "params", "states", "is_complex", "low_precision", "sparse")

    def __init__(self, key: tuple) -> None:
        self.key = key
        self.p, self.g = TensorList(), TensorList()  # complex params as view_as_real pairs
        self.s: dict[str, TensorList] = {}
        self.steps: list[Tensor] = []
        self.params: list[Tensor] = []          # the parameters themselves (not real views)
        self.states: list[dict[str, Any]] = []
        self.is_complex = False
        self.low_precision = False              # fp32_state / stochastic_rounding applies
        self.sparse = False                     # a gradient is sparse: the eager path runs it
