"""Block-wise codes: how a float state tensor becomes a few bits per entry and back.

A code maps a flat float tensor, padded to a whole number of blocks, to ``codes`` (one or
half a byte per entry) and ``scales`` (one number per block, the block's largest magnitude),
and back. Everything here is plain tensor arithmetic, so the same functions run eagerly on a
chunk of a tensor and inside a compiled (``torch.compile``) kernel.

- :class:`PowerCode` (int8, int4): entry ``k`` of a block with scale ``s`` means
  ``s * sign(k) * (|k| / K) ** power``. ``power = 2`` spends the levels where the values
  are (most of a block is far below its maximum); for a second moment ``v`` it is a linear
  code on ``sqrt(v)``. An unsigned code takes entries >= 0 as they are (no ``abs``: a fused
  kernel then takes one square root of ``v`` for the update and the code). A non-negative
  state never reads as zero in a block that is not all zeros: its smallest level stands for
  anything below it (a small ``v`` rounded to 0 under a non-zero first moment would make
  ``m / (sqrt(v) + eps)`` explode).
- :class:`Fp8Code`: float8 e4m3 of ``x / s`` with ``s = max|x| / 448`` per block.
- :class:`Bf16Code`: bfloat16, rounded stochastically (no scales).

Stochastic rounding draws its noise from :func:`uniform_noise`: a window of a fixed table of
uniform numbers, placed by a hash of a seed and the entries' position, so the same step of the
same tensor gets the same noise after a resume, with no generator state to save (and no
random numbers generated per step: a window is a view).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["NOISE_WINDOW", "Bf16Code", "Code", "Fp8Code", "PowerCode", "noise_offset", "uniform_noise"]

#: The longest run of noise one call takes (the table holds twice this many numbers).
NOISE_WINDOW = 1 << 18
_TABLES: dict[torch.device, Tensor] = {}


def _table(device: torch.device) -> Tensor:
    table = _TABLES.get(device)
    if table is None:
        gen = torch.Generator().manual_seed(0x5EED)
        table = _TABLES[device] = torch.rand(2 * NOISE_WINDOW, generator=gen).to(device)
    return table


def noise_offset(seed: int, start: int) -> int:
    """Where the noise of entries ``start ..`` of a state seeded ``seed`` begins in the table."""
    h = (seed * 0x9E3779B1 + start * 0x85EBCA77) & 0xFFFFFFFF
    h ^= h >> 15
    h = (h * 0x2C1B3C6D) & 0xFFFFFFFF
    return (h ^ (h >> 12)) % NOISE_WINDOW


def uniform_noise(offset: int | Tensor, n: int, device: torch.device) -> Tensor:
    """``n`` numbers in [0, 1) from ``offset`` (a :func:`noise_offset`) on: a view of the table,
    or, for a 0-d tensor ``offset`` (inside a compiled step), a gather from it."""
    table = _table(torch.device(device))
    if isinstance(offset, Tensor):
        return table[offset + torch.arange(n, device=table.device)]
    if n > NOISE_WINDOW:
        return torch.rand(n, generator=torch.Generator().manual_seed(offset)).to(device)
    return table[offset:offset + n]


def _round_up_bf16(x: Tensor) -> Tensor:
    """Non-negative float32 ``x`` rounded up to a bfloat16 value (then stored without loss)."""
    bits = x.view(torch.int32)
    return ((bits + 0xFFFF) & -65536).view(torch.float32)


class Code:
    """How one state tensor is stored: ``block`` entries share a scale; ``bits`` per entry."""

    name: str
    block: int
    bits: int
    stochastic: bool = False
    scale_dtype: torch.dtype | None = torch.float32
    code_dtype: torch.dtype = torch.uint8

    def padded(self, numel: int) -> int:
        return -(-numel // self.block) * self.block

    def code_offset(self, entries: int) -> int:
        """Where entry ``entries`` (a multiple of ``block``) starts in the codes tensor."""
        return entries * self.bits // (8 * self.code_dtype.itemsize)

    def code_len(self, numel: int) -> int:
        """Length of the codes tensor of a state with ``numel`` entries."""
        return self.code_offset(self.padded(numel))

    def scale_len(self, numel: int) -> int:
        return self.padded(numel) // self.block if self.scale_dtype is not None else 0

    def encode(self, x: Tensor, noise: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(codes, scales) of float32 ``x``, flat or one row per block (a multiple of ``block``
        entries). The codes come one row per block; they may be floats holding what the codes
        tensor stores: ``codes_tensor.copy_(codes)`` converts them (truncating towards zero)
        in the pass that writes them."""
        raise NotImplementedError

    def decode(self, codes: Tensor, scales: Tensor | None, dtype: torch.dtype) -> Tensor:
        """What ``codes`` and ``scales`` (flat) stand for, in ``dtype``, one row per block.
        (Rows keep the index arithmetic of a compiled kernel simple.)"""
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name

    def __reduce__(self) -> Any:
        # A copy of the optimizer (deepcopy, pickle) keeps using the codes of the table, by name.
        from .formats import code_named

        return (code_named, (self.name,)) if code_named(self.name) is self else super().__reduce__()


class PowerCode(Code):
    """``K = 2**(bits-1) - 1`` levels each side of zero (signed) or ``2**bits - 1`` (unsigned).
    8-bit codes are stored as int8 (unsigned ones as ``k - 128``: CPUs convert floats to int8
    several times faster than to uint8); 4-bit codes two to a byte (signed ones as ``k + 8``),
    the first half of a block in the low nibbles, the second half in the high ones."""

    def __init__(self, name: str, bits: int, block: int, power: int, signed: bool, stochastic: bool,
                 scale_dtype: torch.dtype = torch.float32) -> None:
        if power not in (1, 2) or bits not in (4, 8):
            raise ValueError(f"a PowerCode has power 1 or 2 and 4 or 8 bits, got power={power}, bits={bits}")
        self.name, self.bits, self.block, self.power = name, bits, block, power
        self.signed, self.stochastic, self.scale_dtype = signed, stochastic, scale_dtype
        self.levels = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
        self.code_dtype = torch.int8 if bits == 8 else torch.uint8
        self.offset = (0 if signed else -128) if bits == 8 else (self.levels + 1 if signed else 0)
        #: The least scale of a non-zero block: ``K / s`` (power 1; ``K / sqrt(s)`` cannot
        #: overflow) stays finite, with room for a division rounded less carefully than IEEE's.
        self.least_scale = self.levels * 2.0**-127 if power == 1 else 0.0

    def invertible(self, s: Tensor) -> Tensor:
        """Block scales ``s`` (largest magnitudes), those of non-zero blocks raised to
        :attr:`least_scale` (its levels then stand for the block's tiny entries)."""
        if not self.least_scale:
            return s
        return torch.where(s > 0, s.clamp(min=self.least_scale), s)

    def encode(self, x, noise):
        K = self.levels
        xb = x.view(-1, self.block)
        mag = xb.abs() if self.signed else xb      # (so a fused kernel shares v.sqrt() with the update)
        s = self.invertible(mag.amax(1, keepdim=True))
        if self.scale_dtype == torch.bfloat16:
            s = _round_up_bf16(s)                             # so that |x| / s <= 1 still holds
        if self.power == 1:                                   # y = K x / s, in [-K, K] (no sign work)
            y = (xb if self.signed else mag).mul(torch.where(s > 0, K / s, 0.0))
        else:   # y = K sqrt(|x| / s), in [0, K] (sqrt(|x|) first: a fused kernel shares it with v.sqrt())
            y = (mag.sqrt_() if self.signed else mag.sqrt()).mul_(torch.where(s > 0, K / s.sqrt(), 0.0))
        if noise is None:
            k = y.round_()
        elif self.power == 1 and self.bits == 4:              # floor(y + u) + offset, as a truncation
            k = y.clamp_(-K, K).add_(noise.view_as(y)).add_(self.offset).to(torch.int8)
            return self._pack(k.view(torch.uint8)), s.view(-1).to(self.scale_dtype)
        elif self.power == 1:                                 # up with probability frac(y)
            k = y.add_(noise.view_as(y)).floor_().clamp_(-K, K)
        else:                                                 # unbiased between (k/K)^2 and ((k+1)/K)^2
            lo = y.floor()
            k = lo.add_(noise.view_as(y) * (2 * lo + 1) < y * y - lo * lo).clamp_(max=K)
        if self.signed and self.power == 2:
            k = k.copysign_(xb)
        if not self.signed:   # never 0 in a non-zero block: v = 0 under m != 0 makes m / sqrt(v) explode
            k = k.clamp_(min=1)
        if self.bits == 8:
            return k.add_(self.offset) if self.offset else k, s.view(-1).to(self.scale_dtype)
        k = k.add_(self.offset) if self.offset else k
        return self._pack(k.to(torch.int8).view(torch.uint8)), s.view(-1).to(self.scale_dtype)

    def _pack(self, k: Tensor) -> Tensor:
        halves = k.view(-1, 2, self.block // 2)
        return halves[:, 0] | (halves[:, 1] << 4)

    def decode(self, codes, scales, dtype):
        if self.bits == 4:
            rows = codes.view(-1, self.block // 2)
            codes = torch.stack((rows & 15, rows >> 4), dim=1)
        r = codes.view(-1, self.block).to(torch.float32)
        if self.offset:
            r = r.sub_(self.offset)
        if self.power == 2:
            r = r.mul_(r.abs() if self.signed else r)
        factor = scales.to(torch.float32).view(-1, 1) * (1.0 / self.levels**self.power)
        return r.mul_(factor).to(dtype)


_FP8_VALUES: dict[torch.device, Tensor] = {}


def _fp8_values(device: torch.device) -> Tensor:
    """The 256 values of float8 e4m3 (decoding through this table is faster on CPU than torch's
    own conversion)."""
    values = _FP8_VALUES.get(device)
    if values is None:
        byte = torch.arange(256, dtype=torch.int32).to(torch.uint8)
        values = _FP8_VALUES[device] = byte.view(torch.float8_e4m3fn).to(torch.float32).to(device)
    return values


class Fp8Code(Code):
    """float8 e4m3 with one float32 scale per block (``max|x|`` maps to 448, e4m3's largest)."""

    bits = 8
    code_dtype = torch.float8_e4m3fn
    _MAX = 448.0
    _TINY = 2.0**-9              # e4m3's smallest subnormal
    #: The least scale of a non-zero block (``1 / s`` stays finite, as in PowerCode).
    _LEAST_SCALE = 2.0**-127

    def __init__(self, name: str, block: int, signed: bool) -> None:
        self.name, self.block, self.signed = name, block, signed

    def encode(self, x, noise):
        xb = x.view(-1, self.block)
        top = (xb.abs() if self.signed else xb).amax(1, keepdim=True)
        s = top * (1.0 / self._MAX)
        s = torch.where(top > 0, s.clamp(min=self._LEAST_SCALE), s)   # (top / 448 of denormals may be 0)
        y = xb * torch.where(s > 0, 1.0 / s, 0.0)
        if not self.signed:          # never 0 in a non-zero block (see PowerCode)
            y = y.clamp_(min=self._TINY)
        return y, s.view(-1)

    def decode(self, codes, scales, dtype):
        if torch.compiler.is_compiling():
            values = codes.to(torch.float32)
        else:
            values = torch.index_select(_fp8_values(codes.device), 0, codes.view(torch.uint8).to(torch.int32))
        return values.view(-1, self.block).mul_(scales.view(-1, 1)).to(dtype)


class Bf16Code(Code):
    """bfloat16 (float32's upper 16 bits), rounded stochastically: unbiased, so an EMA's small
    increments survive in expectation instead of rounding away. (inf and the NaNs arithmetic
    makes keep their value: their low bits do not reach the upper 16.)"""

    name, block, bits, stochastic = "bf16", 1, 16, True
    scale_dtype = None
    code_dtype = torch.bfloat16

    def encode(self, x, noise):
        bits = x.view(-1, 1).view(torch.int32) + (noise.view(-1, 1) * 65536.0).to(torch.int32)
        return bits.bitwise_and_(-65536).view(torch.float32), None

    def decode(self, codes, scales, dtype):
        return codes.view(-1, 1).to(dtype)
