"""Block-wise codes: how a float state tensor becomes a few bits per entry and back.

A code maps a flat float tensor, padded to a whole number of blocks, to ``codes`` (one or
half a byte per entry) and ``scales`` (one number per block, the block's largest magnitude),
and back. Everything here is plain tensor arithmetic, so the same functions run eagerly on a
chunk of a tensor and inside a ``torch.compile`` d kernel.

- :class:`PowerCode` (int8, int4): entry ``k`` of a block with scale ``s`` means
  ``s * sign(k) * (|k| / K) ** power``. ``power = 2`` spends the levels where the values
  are (most of a block is far below its maximum); for a second moment ``v`` it is a linear
  code on ``sqrt(v)``. Positive values of a non-negative state never round to zero (an
  entry ``v = 0`` under a non-zero first moment would make ``m / (sqrt(v) + eps)`` explode).
- :class:`Fp8Code`: float8 e4m3 of ``x / s`` with ``s = max|x| / 448`` per block.
- :class:`Bf16Code`: bfloat16, rounded stochastically (no scales).

Stochastic rounding draws its noise from :func:`uniform_noise`, a hash of a seed and the
entry's index: the same step of the same tensor gets the same noise after a resume, with no
generator state to save.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Bf16Code", "Code", "Fp8Code", "PowerCode", "uniform_noise"]

_MASK32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (a lowbias32-style finalizer), on int64 holding values < 2**32.
    Both multipliers are below 2**31, so no product leaves int64."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _MASK32
    return x ^ (x >> 16)


def uniform_noise(seed: Tensor | int, start: int, n: int, device: torch.device) -> Tensor:
    """``n`` float32 numbers in [0, 1), a function of ``seed`` and the indices
    ``start .. start + n - 1`` only (24 random bits each)."""
    idx = torch.arange(start, start + n, dtype=torch.int64, device=device)
    return (_mix32((idx + seed) & _MASK32) >> 8).to(torch.float32) * (1.0 / (1 << 24))


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
        """(codes, scales) of a flat float32 ``x`` whose length is a multiple of ``block``."""
        raise NotImplementedError

    def decode(self, codes: Tensor, scales: Tensor | None, dtype: torch.dtype) -> Tensor:
        """The flat tensor (of ``dtype``) that ``codes`` and ``scales`` stand for."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class PowerCode(Code):
    """``K = 2**(bits-1) - 1`` levels each side of zero (signed) or ``2**bits - 1`` (unsigned)."""

    def __init__(self, name: str, bits: int, block: int, power: int, signed: bool, stochastic: bool,
                 scale_dtype: torch.dtype = torch.float32) -> None:
        self.name, self.bits, self.block, self.power = name, bits, block, power
        self.signed, self.stochastic, self.scale_dtype = signed, stochastic, scale_dtype
        self.levels = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
        self.offset = self.levels + 1 if signed else 0      # stored code = k + offset >= 0

    def encode(self, x, noise):
        K = self.levels
        xb = x.view(-1, self.block)
        mag = xb.abs()
        s = mag.amax(1, keepdim=True)
        if self.scale_dtype == torch.bfloat16:
            s = _round_up_bf16(s)                             # so that |x| / s <= 1 still holds
        r = mag * torch.where(s > 0, 1.0 / s, 0.0)           # |x| / s, in [0, 1]
        y = (r.sqrt() if self.power == 2 else r) * K          # the code as a real number
        if noise is None:
            k = y.round()
        elif self.power == 1:
            k = (y + noise.view_as(y)).floor()                # up with probability frac(y)
        else:                                                 # unbiased between the two levels
            k = y.floor()
            lo, hi = (k / K) ** 2, ((k + 1) / K) ** 2
            k = k + (noise.view_as(y) * (hi - lo) < r - lo).to(k.dtype)
        k = k.clamp(max=K)
        if self.signed:
            k = torch.where(xb < 0, -k, k)
        else:
            k = torch.maximum(k, (mag > 0).to(k.dtype))       # positive stays positive
        codes = (k + self.offset).to(torch.uint8).view(-1)
        if self.bits == 4:
            pairs = codes.view(-1, 2)
            codes = pairs[:, 0] | (pairs[:, 1] << 4)
        return codes, s.view(-1).to(self.scale_dtype)

    def decode(self, codes, scales, dtype):
        if self.bits == 4:
            codes = torch.stack((codes & 15, codes >> 4), dim=-1).view(-1)
        r = (codes.to(torch.float32) - self.offset) * (1.0 / self.levels)
        if self.power == 2:
            r = r * r.abs()
        out = r.view(-1, self.block) * scales.to(torch.float32).view(-1, 1)
        return out.view(-1).to(dtype)


class Fp8Code(Code):
    """float8 e4m3 with one float32 scale per block (``max|x|`` maps to 448, e4m3's largest)."""

    bits = 8
    code_dtype = torch.float8_e4m3fn
    _MAX = 448.0
    _TINY = 2.0**-9              # e4m3's smallest subnormal

    def __init__(self, name: str, block: int, signed: bool) -> None:
        self.name, self.block, self.signed = name, block, signed

    def encode(self, x, noise):
        xb = x.view(-1, self.block)
        s = xb.abs().amax(1, keepdim=True) * (1.0 / self._MAX)
        y = xb * torch.where(s > 0, 1.0 / s, 0.0)
        if not self.signed:                                   # positive stays positive
            y = torch.where((y > 0) & (y < self._TINY), self._TINY, y)
        return y.to(self.code_dtype).view(-1), s.view(-1)

    def decode(self, codes, scales, dtype):
        out = codes.to(torch.float32).view(-1, self.block) * scales.view(-1, 1)
        return out.view(-1).to(dtype)


class Bf16Code(Code):
    """bfloat16 (float32's upper 16 bits), rounded stochastically: unbiased, so an EMA's small
    increments survive in expectation instead of rounding away."""

    name, block, bits, stochastic = "bf16", 1, 16, True
    scale_dtype = None
    code_dtype = torch.bfloat16

    def encode(self, x, noise):
        bits = x.view(torch.int32)
        rounded = ((bits + (noise * 65536.0).to(torch.int32)) & -65536).view(torch.float32)
        return torch.where(torch.isfinite(x), rounded, x).to(torch.bfloat16), None

    def decode(self, codes, scales, dtype):
        return codes.to(dtype)
