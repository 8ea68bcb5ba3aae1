"""Low-precision parameters: float32 state and stochastic rounding for bf16/fp16 params.

A bf16 number has 8 significant bits: ``p * (1 - lr * wd)`` with ``lr * wd = 1e-4``, or
``p - 1e-3`` for ``p = 1``, rounds back to ``p`` — weight decay and small updates vanish
silently, and so does ``v * 0.999`` in a bf16 second moment. Two opt-in base options (see
:meth:`optforge.Optimizer.configure`) fix that for every optimizer, without changing it:

- ``fp32_state``: state tensors of bf16/fp16 params are float32;
- ``stochastic_rounding``: the new bf16 parameter is rounded up or down at random, with the
  probabilities that make its expectation the float32 result (unbiased, no extra memory).

With either, a bucket's update (weight decay included) runs on float32 copies of its params and
grads, and the results are written back once: state in its own dtype, params rounded to
nearest, or stochastically.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .tensorlist import TensorList

__all__ = ["LOW_PRECISION", "check_low_precision", "computes_in_float32", "float32_copies",
           "restore_float32_state", "stochastic_round_", "write_back"]

LOW_PRECISION = (torch.bfloat16, torch.float16)


def stochastic_round_(dst: Tensor, src: Tensor) -> Tensor:
    """Write float32 ``src`` into bfloat16 ``dst``, rounding stochastically: a value between two
    bf16 neighbours goes to the upper one with probability proportional to its distance from
    the lower one. (bf16 is float32's upper 16 bits: add 16 random low bits, truncate.)"""
    bits = src.view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    rounded = bits.add(noise).bitwise_and_(-65536).view(torch.float32)   # -65536 == 0xFFFF0000
    return dst.copy_(torch.where(torch.isfinite(src), rounded, src))     # keep inf/NaN as they are


def computes_in_float32(group: dict[str, Any], dtype: torch.dtype) -> bool:
    """Whether a bucket of ``dtype`` params runs its update on float32 copies (``fp32_state``
    or ``stochastic_rounding`` on bfloat16/float16 params)."""
    return bool(group.get("fp32_state") or group.get("stochastic_rounding")) and dtype in LOW_PRECISION


def check_low_precision(group: dict[str, Any], dtype: torch.dtype) -> None:
    """Refuse, before a step changes anything, a dtype the group's options cannot serve."""
    if group.get("stochastic_rounding") and dtype in LOW_PRECISION and dtype != torch.bfloat16:
        raise ValueError(f"stochastic_rounding supports bfloat16 parameters, got {dtype} "
                         "(use fp32_state for float16)")


def float32_copies(group: dict[str, Any], b: Any) -> tuple[TensorList, TensorList, dict[str, TensorList]]:
    """Float32 (params, grads, state) of a low-precision bucket, for ``write_back`` later.
    State already in float32 (``fp32_state``) is used as it is."""
    f32 = torch.float32
    p = TensorList(x.to(f32) for x in b.p)
    g = TensorList(x.to(f32) for x in b.g)
    s = {name: TensorList(x.to(f32) for x in xs) for name, xs in b.s.items()}
    return p, g, s


def write_back(group: dict[str, Any], b: Any, p: TensorList, s: dict[str, TensorList]) -> None:
    """The float32 results into the bucket: state in its own dtype, params rounded to nearest
    or, with ``stochastic_rounding``, stochastically."""
    for name, xs in b.s.items():
        pairs = [(x, y) for x, y in zip(xs, s[name]) if x is not y]   # state kept in low precision
        if pairs:
            torch._foreach_copy_([x for x, _ in pairs], [y for _, y in pairs])
    if group.get("stochastic_rounding"):
        for x, y in zip(b.p, p):
            stochastic_round_(x, y)
    else:
        torch._foreach_copy_(b.p, p)


def restore_float32_state(group: dict[str, Any], p: Tensor, saved: dict[str, Any],
                          state: dict[str, Any]) -> None:
    """After ``load_state_dict`` cast a low-precision param's ``state`` to the param's dtype (as
    torch does), give back float32 what the optimizer keeps in float32: every floating state
    tensor with ``fp32_state``; with ``stochastic_rounding``, what was ``saved`` in float32 (an
    iterate, such as Schedule-Free's ``z``, that would lose its small steps in bf16). Either
    way the bucket's update runs in float32, so a resumed run continues bit for bit."""
    all_float32 = group.get("fp32_state")
    if p.dtype not in LOW_PRECISION or not (all_float32 or group.get("stochastic_rounding")):
        return
    for name, x in saved.items():
        if (name != "step" and torch.is_tensor(x) and x.is_floating_point()
                and (all_float32 or x.dtype == torch.float32)):
            state[name] = x.to(device=p.device, dtype=torch.float32)
