"""The temporaries of an eager low-bit step, allocated once per step and reused by every chunk.

The eager step decodes each chunk of state entries into a float buffer, runs the update on
it and encodes it back (:mod:`optforge.lowbit.step`). :class:`ChunkBuffers` holds one float
buffer per low-bit state and a scratch buffer for the encoding; on CPU they come from the
optimizer's scratch pool (:mod:`optforge.scratch`), so later steps reuse their memory instead
of paying a page fault per 4 KiB of fresh memory.

8-bit power codes (int8 state) decode into and encode from these buffers without any other
entry-sized temporary (:func:`decode_into`, :func:`encode_into`): the operations of
``PowerCode.decode`` and ``PowerCode.encode``, in the same order, so the same numbers bit for
bit. The other codes allocate their temporaries as ``Code.decode`` / ``Code.encode`` do.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import scratch
from .codes import Code, PowerCode

__all__ = ["ChunkBuffers", "decode_into", "encode_into", "in_place"]


class ChunkBuffers:
    """Named buffers of one eager step on ``device``, each grown to the largest chunk that
    asked for it (at least ``least`` entries, so one allocation usually serves the step)."""

    def __init__(self, device: torch.device, least: int) -> None:
        self.device, self.least = device, least
        self.pool = scratch.active() if device.type == "cpu" else None
        self.held: dict[Any, Tensor] = {}

    def take(self, key: Any, n: int, dtype: torch.dtype) -> Tensor:
        """``n`` entries of buffer ``key`` (contents arbitrary)."""
        buf = self.held.get((key, dtype))
        if buf is None or buf.numel() < n:
            shape = (max(n, self.least),)
            buf = (torch.empty(shape, dtype=dtype, device=self.device) if self.pool is None
                   else self.pool.take_new(shape, dtype, self.device))
            self.held[key, dtype] = buf
        return buf[:n]


def in_place(code: Code, dtype: torch.dtype) -> bool:
    """Whether a state of ``code`` decoded into ``dtype`` takes :func:`decode_into` and
    :func:`encode_into`: an 8-bit power code with float32 scales, rounded to nearest, of a
    float32 state."""
    return (isinstance(code, PowerCode) and code.bits == 8 and not code.stochastic
            and code.scale_dtype == torch.float32 and dtype == torch.float32)


def decode_into(code: PowerCode, codes: Tensor, scales: Tensor, out: Tensor) -> None:
    """``code.decode(codes, scales, torch.float32)``, written into ``out``."""
    r = out.view(-1, code.block)
    r.view(-1).copy_(codes)
    if code.offset:
        r.sub_(code.offset)
    if code.power == 2:
        r.mul_(r.abs() if code.signed else r)
    r.mul_(scales.view(-1, 1) * (1.0 / code.levels**code.power))


def encode_into(code: PowerCode, x: Tensor, work: Tensor) -> tuple[Tensor, Tensor]:
    """``code.encode(x, None)`` with ``work`` (``x``'s size) as its only entry-sized
    temporary: (codes as floats, a view of ``work``; scales)."""
    K = code.levels
    xb, y = x.view(-1, code.block), work.view(-1, code.block)
    if code.signed:
        s = torch.abs(xb, out=y).amax(1, keepdim=True)
    else:
        s = xb.amax(1, keepdim=True)
    if code.power == 1:
        torch.mul(xb, torch.where(s > 0, K / s, 0.0), out=y)
    else:
        (y.sqrt_() if code.signed else torch.sqrt(xb, out=y)).mul_(torch.where(s > 0, K / s.sqrt(), 0.0))
    k = y.round_()
    if code.signed and code.power == 2:
        k.copysign_(xb)
    if not code.signed:
        k.clamp_(min=1)
    if code.offset:
        k.add_(code.offset)
    return k.view(-1), s.view(-1)
