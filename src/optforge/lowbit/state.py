"""`LowBitState`: one optimizer state tensor held as codes + per-block scales.

It is what ``optimizer.state[p][name]`` holds for a low-bit state. The update never sees it:
the step reads a range of entries (decoded into a temporary), runs the optimizer's update,
and writes the range back (encoded), chunk by chunk. In ``state_dict()`` it is a plain dict
of tensors (:meth:`to_dict`), so ``torch.load(weights_only=True)`` reads checkpoints.
"""

from __future__ import annotations

import functools
import math
import zlib
from typing import Any

import torch
from torch import Tensor

from .codes import Code, noise_offset, uniform_noise

__all__ = ["CHUNK", "LowBitState", "noise_for", "noise_seed"]

#: Entries decoded at a time (a multiple of every block size): bounds the float32
#: temporaries of a step or a conversion to a few of this size per state.
CHUNK = 1 << 18


class LowBitState:
    """``shape`` entries in ``code``'s format: ``codes`` and ``scales``, flat, padded to whole
    blocks. Complex parameters' state is held as its real view (a trailing dimension of 2).

    The state of a DTensor parameter (FSDP2) is its local shard's, in blocks of its own:
    ``origin`` is where the shard begins in the whole tensor (row-major), so stochastic
    rounding draws the noise an unsharded state would at the same entries; ``layout`` is the
    parameter's ``(mesh, placements, shape)`` (None for a plain tensor)."""

    __slots__ = ("code", "codes", "scales", "shape", "numel", "origin", "layout")

    def __init__(self, code: Code, codes: Tensor, scales: Tensor | None, shape: torch.Size) -> None:
        self.code, self.codes, self.scales = code, codes, scales
        self.shape = torch.Size(shape)
        self.numel = math.prod(self.shape)
        self.origin = 0
        self.layout: tuple | None = None

    @classmethod
    def empty(cls, code: Code, shape: torch.Size, device: torch.device) -> LowBitState:
        n = math.prod(shape)
        codes = torch.empty(code.code_len(n), dtype=code.code_dtype, device=device)
        scales = (None if code.scale_dtype is None
                  else torch.empty(code.scale_len(n), dtype=code.scale_dtype, device=device))
        return cls(code, codes, scales, shape)

    @classmethod
    def quantize(cls, code: Code, x: Tensor, seed: int, origin: int = 0) -> LowBitState:
        """``x`` (a real tensor, beginning at entry ``origin`` of a whole one) encoded, a chunk
        at a time."""
        out = cls.empty(code, x.shape, x.device)
        out.origin = origin
        flat = x.reshape(-1)
        for start in range(0, out.numel, CHUNK):
            out.write(start, flat[start:start + CHUNK], seed)
        return out

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        """The whole tensor, decoded into ``dtype``."""
        out = torch.empty(self.numel, dtype=dtype, device=self.codes.device)
        for start in range(0, self.numel, CHUNK):
            stop = min(start + CHUNK, self.numel)
            out[start:stop] = self.read(start, stop, dtype)[:stop - start]
        return out.view(self.shape)

    def ranges(self, start: int, stop: int) -> tuple[slice, slice | None]:
        """The codes and scales behind entries [start, stop); ``start`` is block-aligned, and
        ``stop`` too unless it is the end (then the padding is included)."""
        code = self.code
        end = code.padded(stop)
        codes = slice(code.code_offset(start), code.code_offset(end))
        scales = None if self.scales is None else slice(start // code.block, end // code.block)
        return codes, scales

    def read(self, start: int, stop: int, dtype: torch.dtype) -> Tensor:
        """Entries [start, stop) decoded into ``dtype``, padded to whole blocks (the padding is
        zeros; slice ``[:stop - start]`` for the entries)."""
        codes, scales = self.ranges(start, stop)
        scales = None if scales is None else self.scales[scales]
        return self.code.decode(self.codes[codes], scales, dtype).view(-1)

    def write(self, start: int, x: Tensor, seed: int) -> None:
        """Encode ``x`` into entries [start, start + len(x)) (block-aligned ``start``; a length
        that ends off a block boundary must end the tensor; :meth:`read`'s padded result, as
        it is, fits). ``seed`` (an int) and the entries' place in the whole tensor place the
        noise of stochastic rounding (:func:`noise_for`)."""
        n = x.numel()
        padded = self.code.padded(n)
        x = x.reshape(-1).to(torch.float32)
        if padded != n:
            x = torch.cat((x, x.new_zeros(padded - n)))
        noise = noise_for(seed, self.origin + start, padded, x.device) if self.code.stochastic else None
        codes, scales = self.code.encode(x, noise)
        c, s = self.ranges(start, start + n)
        self.codes[c] = codes.view(-1)
        if s is not None:
            self.scales[s] = scales

    # ---- checkpoints ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A ``state_dict`` entry: tensors (references, as torch's ``state_dict``), the shape
        and the code's name."""
        out: dict[str, Any] = {"code": self.code.name, "shape": list(self.shape), "codes": self.codes}
        if self.scales is not None:
            out["scales"] = self.scales
        return out

    @classmethod
    def from_dict(cls, entry: dict[str, Any], code: Code, device: torch.device) -> LowBitState:
        """The state a :meth:`to_dict` entry (of ``code``) describes, copied to ``device``;
        ValueError if its tensors do not fit the shape."""
        shape = torch.Size(entry["shape"])
        n = math.prod(shape)
        codes, scales = entry["codes"], entry.get("scales")
        want = [(codes, code.code_len(n), code.code_dtype, "codes")]
        if code.scale_dtype is not None:
            want.append((scales, code.scale_len(n), code.scale_dtype, "scales"))
        for x, length, dtype, what in want:
            if not torch.is_tensor(x) or x.dtype != dtype or x.shape != (length,):
                got = (f"{x.dtype} of shape {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__)
                raise ValueError(f"a state of shape {tuple(shape)} in code {code.name!r} needs {what} of "
                                 f"{dtype} and length {length}, got {got}")
        return cls(code, codes.to(device, copy=True),
                   None if code.scale_dtype is None else scales.to(device, copy=True), shape)


def noise_for(seed: int, start: int, n: int, device: torch.device) -> Tensor:
    """The noise of stochastic rounding for entries [start, start + n) of a whole state tensor
    (``start`` counted from its first entry, a shard's origin included) seeded ``seed``: each run
    of :data:`CHUNK` entries from a multiple of it takes the window of the table that its seed
    and first entry place. The noise of an entry depends on its place alone, so a shard rounds
    as the whole tensor would, however the tensor is split."""
    parts = []
    while n > 0:
        run = start // CHUNK * CHUNK
        take = min(n, run + CHUNK - start)
        parts.append(uniform_noise(noise_offset(seed, run) + start - run, take, device))
        start, n = start + take, n - take
    if not parts:
        return torch.empty(0, device=device)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def noise_seed(step: float, index: int, name: str) -> int:
    """The seed of stochastic rounding for state ``name`` of parameter ``index`` at ``step``:
    the same numbers give the same rounding, in any process."""
    h = (int(step) * 0x9E3779B1 + index * 0x85EBCA77 + _name_hash(name)) & 0xFFFFFFFF
    h = ((h ^ (h >> 16)) * 0x7FEB352D) & 0xFFFFFFFF
    return h ^ (h >> 15)


@functools.lru_cache(maxsize=256)
def _name_hash(name: str) -> int:
    return zlib.crc32(name.encode())
