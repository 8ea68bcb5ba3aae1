"""Low-bit optimizer state for every elementwise optimizer: ``state_precision``.

Optimizer state is often the largest memory cost of training (AdamW: 8 bytes per float32
parameter). The base option ``state_precision`` stores it in fewer bits, for any optimizer
whose update is elementwise (``scalars`` + ``kernel``), a user's own included::

    opt = optforge.AdamW(model.parameters(), lr=1e-3).configure(state_precision="int8")

- ``"bf16"``: bfloat16, rounded stochastically (2 bytes per entry);
- ``"int8"``: one byte per entry, a scale per block of 256;
- ``"fp8"``: float8 e4m3, a scale per block of 256;
- ``"int4"``: half a byte per entry, a bfloat16 scale per block of 64, rounded
  stochastically.

Each state is coded by its kind, which the optimizer declares in ``state_kinds`` (undeclared
states are ``"signed"``): ``"signed"`` (a first moment), ``"non_negative"`` (a second moment:
never read as zero in a block that is not all zeros), ``"sign"`` (only its sign matters
downstream, Lion's momentum), ``"slow"`` (a signed average with beta near 1, AdEMAMix's slow
EMA; ``"int4"`` keeps both of these in int8, where 4 bits measured worse training), or
``"full"`` (kept in full precision: an iterate such as Schedule-Free's ``z``).
Tensors with fewer than ``min_quantized_size`` entries (default 4096: biases, norms) keep
full-precision state: they cost little memory and are where rounding hurts most.

The step decodes a chunk of entries, runs the optimizer's update on it, and encodes it back
(:mod:`optforge.lowbit.step`); ``fused=True`` does the three in one compiled pass per chunk.
``state_dict()`` holds the codes and scales (:class:`LowBitState.to_dict`); a full-precision
checkpoint loads into a low-bit optimizer (encoded on load) and a low-bit one into a
full-precision optimizer (decoded). DTensor parameters sharded on dim 0 (FSDP2) keep their
local shard's state, in blocks of its own (:mod:`optforge.lowbit.shards`). See docs/memory.md
and docs/distributed.md.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from ..constraints import integer_at_least, one_of
from ..distributed import is_dtensor, local, placed_as
from ..tensorlist import TensorList
from .checkpoint import convert_state, export_state, plan_load
from .formats import CODES, KINDS, PRECISIONS, code_for
from .shards import quantize_shard
from .state import LowBitState, noise_seed
from .step import fused_applies, step_eager, step_fused

__all__ = ["CODES", "KINDS", "OPTIONS", "OPTION_CONSTRAINTS", "PRECISIONS", "LowBitState", "check_configure",
           "check_distributed", "check_supported", "code_for", "convert_state", "export_state", "holds",
           "plan_load", "step", "stored"]

#: The base options this module adds to every optforge optimizer (see ``Optimizer.configure``).
OPTIONS: dict[str, Any] = dict(state_precision=None, min_quantized_size=4096)
OPTION_CONSTRAINTS = dict(state_precision=one_of(None, *PRECISIONS),
                          min_quantized_size=integer_at_least(0))


def check_supported(cls: type, values: dict[str, Any]) -> None:
    """ValueError if ``values`` ask for low-bit state from an optimizer whose update is not
    elementwise (chunks of a tensor could not be updated apart)."""
    precision = values.get("state_precision")
    if precision is None:
        return
    from ..base import _registered_elementwise

    if not (cls.has_kernel() and _registered_elementwise(cls)):
        raise ValueError(f"invalid state_precision={precision!r}: {cls.__name__}'s update is not "
                         "elementwise (it needs whole tensors: norms, factored or matrix state), so "
                         "its state cannot be stored in low precision")
    for name, kind in getattr(cls, "state_kinds", {}).items():
        if kind not in KINDS:
            raise ValueError(f"{cls.__name__}.state_kinds[{name!r}] is {kind!r}, expected one of "
                             + ", ".join(map(repr, KINDS)))


def check_distributed(optimizer_name: str, group: dict[str, Any], param: Tensor) -> None:
    """ValueError for a DTensor parameter that a low-bit group cannot hold: its state is
    quantized in blocks of each rank's shard, which must be a run of whole rows (placements
    ``Shard(0)`` or ``Replicate()``: FSDP2, HSDP)."""
    if group.get("state_precision") is None or not is_dtensor(param):
        return
    from torch.distributed.tensor import Replicate, Shard

    if not all(type(p) is Replicate or (type(p) is Shard and p.dim == 0) for p in param.placements):
        raise ValueError(f"{optimizer_name}(state_precision={group['state_precision']!r}) supports DTensor "
                         "parameters sharded on dim 0 (placements Shard(0) or Replicate(): FSDP2, HSDP); "
                         f"a parameter of shape {tuple(param.shape)} has placements {param.placements} on "
                         f"mesh {param.device_mesh}: use state_precision=None for it (a param group of "
                         "its own)")


def check_configure(opt: Any, given: dict[str, Any]) -> None:
    """The checks of ``configure(**given)`` that look at the parameters (before it changes anything)."""
    check_supported(type(opt), given)
    for group in opt.param_groups:
        for p in group["params"]:
            check_distributed(type(opt).__name__, given, p)


def stored(opt: Any, group: dict[str, Any], param: Tensor, name: str, x: Tensor) -> Any:
    """What ``state[param][name]`` holds for a new state tensor ``x``: ``x`` itself, or its
    low-bit form when ``group``'s ``state_precision`` asks for one."""
    if group.get("state_precision") is None or not torch.is_tensor(x):
        return x
    real = torch.view_as_real(x) if x.is_complex() else x
    code = code_for(opt, group, name, real.shape)     # a DTensor's whole shape: every rank decides alike
    return x if code is None else quantize_shard(code, real, noise_seed(0, 0, name))


def holds(b: Any) -> bool:
    """Whether bucket ``b`` has a low-bit state entry."""
    return any(isinstance(x, LowBitState) for xs in b.s.values() for x in xs)


def step(opt: Any, group: dict[str, Any], b: Any) -> None:
    """One step of a bucket with low-bit state: ``prepare`` (steps, gradient transforms,
    maximize, weight decay) on the whole bucket, the update chunk by chunk, ``finish``;
    with ``fused=True``, one compiled pass per chunk (:func:`step_fused`)."""
    if group.get("fused") and opt.has_kernel() and fused_applies(b):
        step_fused(opt, group, b)
        return
    stateless = copy.copy(b)
    stateless.s = {}               # prepare's float32 copies would not know low-bit state
    w = opt.prepare(group, stateless)
    if any(is_dtensor(p) for p in b.params):       # FSDP2: the update runs on the local shards
        on_shards = copy.copy(b)
        on_shards.s = {name: TensorList(local(x) for x in xs) for name, xs in b.s.items()}
        p = TensorList(local(x) for x in w.p)
        g = TensorList(local(placed_as(g, x)) for g, x in zip(w.g, w.p))
        step_eager(opt, group, on_shards, w._replace(p=p, g=g))
    else:
        step_eager(opt, group, b, w)
    opt.finish(group, w)
