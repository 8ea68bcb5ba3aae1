"""Which code stores which state: the table behind ``state_precision``, by state kind."""

from __future__ import annotations

import math
from typing import Any

import torch

from .codes import Bf16Code, Code, Fp8Code, PowerCode

__all__ = ["CODES", "KINDS", "PRECISIONS", "code_for", "code_named", "kind_of"]

PRECISIONS = ("bf16", "int8", "int4", "fp8")
KINDS = ("signed", "non_negative", "sign", "slow", "full")

_BF16 = Bf16Code()
_INT8_SIGNED = PowerCode("int8-signed", 8, 256, power=1, signed=True, stochastic=False)
_INT4_SIGNED = PowerCode("int4-signed-sr", 4, 64, power=1, signed=True, stochastic=True,
                         scale_dtype=torch.bfloat16)
_FP8_SIGNED = Fp8Code("fp8-signed", 256, signed=True)
_INT8_SIGNED_B64 = PowerCode("int8-signed-b64", 8, 64, power=1, signed=True, stochastic=False,
                             scale_dtype=torch.bfloat16)
#: precision -> state kind -> code (docs/memory.md has the measurements behind each choice).
#: int4 rounds the second moment stochastically too: rounded to nearest, an average with
#: beta2 = 0.999 moves by far less than half an int4 level per step and stays where it is.
#: A "slow" average (beta near 1: AdEMAMix's 0.9999) cannot be held in 4 bits at all
#: (nearest rounding freezes it, stochastic rounding buries it in noise): int4 keeps it in
#: int8, in the blocks of the other int4 states. So does a "sign" state: Lion's momentum
#: (beta2 = 0.99) in 4 bits ended MNIST-1D training 10 % above float32's loss, in int8 1 %.
CODES: dict[str, dict[str, Code]] = {
    "bf16": dict(signed=_BF16, non_negative=_BF16, sign=_BF16, slow=_BF16),
    "int8": dict(signed=_INT8_SIGNED, sign=_INT8_SIGNED, slow=_INT8_SIGNED,
                 non_negative=PowerCode("int8-unsigned", 8, 256, power=2, signed=False, stochastic=False)),
    "int4": dict(signed=_INT4_SIGNED, sign=_INT8_SIGNED_B64, slow=_INT8_SIGNED_B64,
                 non_negative=PowerCode("int4-unsigned-sr", 4, 64, power=2, signed=False, stochastic=True,
                                        scale_dtype=torch.bfloat16)),
    "fp8": dict(signed=_FP8_SIGNED, sign=_FP8_SIGNED, slow=_FP8_SIGNED,
                non_negative=Fp8Code("fp8-unsigned", 256, signed=False)),
}
_BY_NAME: dict[str, Code] = {c.name: c for kinds in CODES.values() for c in kinds.values()}


def kind_of(cls: type, name: str) -> str:
    """The declared kind of state ``name`` (``cls.state_kinds``; "signed" if undeclared)."""
    return getattr(cls, "state_kinds", {}).get(name, "signed")


def code_for(opt: Any, group: dict[str, Any], name: str, shape: torch.Size) -> Code | None:
    """The code of state ``name`` of a (real) parameter of ``shape`` in ``group``; None keeps
    it in full precision."""
    precision = group.get("state_precision")
    if precision is None:
        return None
    kind = kind_of(type(opt), name)
    if kind == "full" or math.prod(shape) < group["min_quantized_size"]:
        return None
    return CODES[precision][kind]


def code_named(name: str) -> Code | None:
    return _BY_NAME.get(name)
