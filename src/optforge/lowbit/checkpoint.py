"""Low-bit state in ``state_dict`` / ``load_state_dict``, and conversion when options change.

- ``state_dict()``: each low-bit entry becomes ``{"code", "shape", "codes", "scales"}`` (plain
  tensors, a string and a list: ``torch.load(weights_only=True)`` reads it); a DTensor
  parameter's, DTensors and its sharding (:mod:`optforge.lowbit.shards`).
- ``load_state_dict()``: torch casts every tensor of a state entry to the parameter's dtype,
  codes included, so low-bit entries are rebuilt from the checkpoint's own tensors: bit for
  bit when the code is the one this optimizer uses, else decoded and encoded again. A
  full-precision entry is encoded where the group asks for low-bit state, and a low-bit one
  decoded where it does not.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .formats import code_for, code_named
from .shards import dequantize_shard, entry_of, load_entry, quantize_shard
from .state import LowBitState, noise_seed

__all__ = ["convert_state", "export_state", "plan_load"]


def export_state(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` (torch's, freshly packed) with low-bit entries as plain dicts."""
    state = state_dict["state"]
    for k, st in state.items():      # a state_dict hook may have put anything there
        if isinstance(st, dict) and any(isinstance(x, LowBitState) for x in st.values()):
            state[k] = {n: entry_of(x) if isinstance(x, LowBitState) else x for n, x in st.items()}
    return state_dict


def _is_entry(x: Any) -> bool:
    return isinstance(x, dict) and "codes" in x and "code" in x


def _full_dtype(group: dict[str, Any], p: Tensor) -> torch.dtype:
    """The dtype of a full-precision state entry of ``p``: the parameter's real dtype, or
    float32 for bf16/fp16 parameters with ``fp32_state``."""
    dtype = p.real.dtype if p.is_complex() else p.dtype
    if dtype in (torch.bfloat16, torch.float16) and group.get("fp32_state"):
        return torch.float32
    return dtype


def _as_param_state(p: Tensor, x: Tensor) -> Tensor:
    return torch.view_as_complex(x) if p.is_complex() else x


def _recode(opt: Any, group: dict[str, Any], p: Tensor, name: str, x: Any, step: float, index: int) -> Any:
    """State ``x`` (a LowBitState or a tensor) in the form ``group`` asks for; ``x`` itself
    when it has it already."""
    real_shape = torch.view_as_real(p).shape if p.is_complex() else p.shape
    code = code_for(opt, group, name, real_shape)
    if isinstance(x, LowBitState):
        if x.code is code:
            return x
        full = dequantize_shard(x, torch.float32 if code is not None else _full_dtype(group, p))
    else:
        if code is None:
            return x
        full = torch.view_as_real(x) if x.is_complex() else x
    if code is None:
        return _as_param_state(p, full)
    return quantize_shard(code, full.to(p.device), noise_seed(step, index, name))


def _step_of(st: dict[str, Any]) -> float:
    step = st.get("step")
    return float(step) if step is not None else 0.0


def convert_state(opt: Any) -> None:
    """Bring every state entry to the form its group's options ask for (after ``configure``)."""
    index = 0
    changed = False
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                for name in opt.state_names_for(group):
                    if name in st:
                        new = _recode(opt, group, p, name, st[name], _step_of(st), index)
                        changed |= new is not st[name]
                        st[name] = new
            index += 1
    if changed:   # fused flat buffers would keep the old state alive
        opt.__dict__.pop("_flat_buckets", None)


def plan_load(opt: Any, state_dict: dict[str, Any], where: dict[Any, tuple[Tensor, dict[str, Any]]]
              ) -> dict[Tensor, dict[str, Any]]:
    """The low-bit entries (and entries decoded from low-bit ones) to put in ``opt.state``
    after torch's ``load_state_dict``; raises ValueError, before anything is loaded, for an
    entry that does not fit its parameter."""
    positions = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    plan: dict[Tensor, dict[str, Any]] = {}
    for k, st in state_dict["state"].items():
        if k not in where:
            continue
        p, group = where[k]
        real_shape = torch.view_as_real(p).shape if p.is_complex() else p.shape
        out = {}
        for name, x in st.items():
            if _is_entry(x):
                code = code_named(x["code"]) if isinstance(x["code"], str) else None
                if code is None:
                    raise ValueError(f"the loaded state {name!r} of parameter {k} is in code "
                                     f"{x['code']!r}, which this version of optforge does not know")
                if tuple(x["shape"]) != tuple(real_shape):
                    raise ValueError(f"the loaded state {name!r} of parameter {k} has shape "
                                     f"{tuple(x['shape'])}, expected {tuple(real_shape)} (the parameter "
                                     f"has shape {tuple(p.shape)})")
                x = load_entry(x, code, p, f"the loaded state {name!r} of parameter {k}")
            elif not (torch.is_tensor(x) and name != "step" and name in opt.state_names_for(group)):
                continue
            new = _recode(opt, group, p, name, x, _step_of(st), positions[id(p)])
            if new is not x or isinstance(new, LowBitState):
                out[name] = new
        if out:
            plan[p] = out
    return plan
