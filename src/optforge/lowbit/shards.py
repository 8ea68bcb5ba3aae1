"""Low-bit state of DTensor parameters (FSDP2, HSDP): each rank quantizes its local shard, in
blocks of its own (a block never spans two ranks, so the step needs no communication and an
empty shard holds nothing).

Checkpoints hold, for such a state, DTensors whose shapes do not depend on the number of ranks
(so torch.distributed.checkpoint saves and reads them as it does the parameters):

- ``codes``: one code per entry (int4's two to a byte are stored one to a byte), shaped and
  placed as the parameter;
- ``scales``: a ``(rows, ceil(row / block))`` table placed as the parameter, each rank's rows
  holding its blocks' scales, in order;
- ``mesh_shape`` and ``placements``: the sharding the blocks were cut by.

A checkpoint loads bit for bit where the parameter is sharded alike (the same world size);
otherwise its blocks do not fit the shards, and loading it is refused (a full-precision
checkpoint, ``configure(state_precision=None)`` before saving it, loads at any world size).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..distributed import is_dtensor, local
from .codes import Code
from .formats import CODES
from .state import LowBitState

__all__ = ["dequantize_shard", "entry_of", "load_entry", "quantize_shard"]


def _origin(x: Tensor) -> int:
    """Where DTensor ``x``'s local shard (a run of whole rows) begins in the whole tensor."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(x.shape, x.device_mesh, x.placements)
    return offset[0] * math.prod(x.shape[1:]) if x.dim() else 0


def quantize_shard(code: Code, x: Tensor, seed: int) -> LowBitState:
    """``x`` encoded (a DTensor: its local shard, with its place in the whole tensor)."""
    if not is_dtensor(x):
        return LowBitState.quantize(code, x, seed)
    out = LowBitState.quantize(code, local(x), seed, origin=_origin(x))
    out.layout = (x.device_mesh, tuple(x.placements), x.shape)
    return out


def dequantize_shard(x: LowBitState, dtype: torch.dtype) -> Tensor:
    """``x`` decoded: a DTensor placed as its parameter for a shard's state."""
    if x.layout is None:
        return x.dequantize(dtype)
    from torch.distributed.tensor import DTensor

    mesh, placements, shape = x.layout
    return DTensor.from_local(x.dequantize(dtype), mesh, placements, run_check=False, shape=shape,
                              stride=_contiguous(shape))


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))


def _per_entry(code: Code, codes: Tensor, n: int) -> Tensor:
    """The first ``n`` codes of a codes tensor, one element per entry."""
    if code.bits == 4:
        rows = codes.view(-1, code.block // 2)
        codes = torch.stack((rows & 15, rows >> 4), dim=1).view(-1)
    return codes[:n]


def _packed(code: Code, entries: Tensor) -> Tensor:
    """A codes tensor from one code per entry, padded to whole blocks with the codes of zeros
    (what the padding holds from the first step on)."""
    n = entries.numel()
    pad = code.padded(n) - n
    if pad:
        zeros = torch.zeros(code.block, device=entries.device)
        of_zeros = torch.empty(code.code_len(code.block), dtype=code.code_dtype, device=entries.device)
        of_zeros.copy_(code.encode(zeros, zeros if code.stochastic else None)[0].reshape(-1))
        entries = torch.cat((entries, _per_entry(code, of_zeros, 1).expand(pad)))
    if code.bits == 4:
        return code._pack(entries).reshape(-1)
    return entries.contiguous()


def entry_of(x: LowBitState) -> dict[str, Any]:
    """``x``'s ``state_dict`` entry (:meth:`LowBitState.to_dict`; for a shard's state, DTensors
    laid out as the module docstring says)."""
    if x.layout is None:
        return x.to_dict()
    from torch.distributed.tensor import DTensor

    mesh, placements, shape = x.layout
    code = x.code
    codes = _per_entry(code, x.codes, x.numel).view(x.shape)
    out: dict[str, Any] = {
        "code": code.name, "shape": list(shape),
        "codes": DTensor.from_local(codes, mesh, placements, run_check=False, shape=shape,
                                    stride=_contiguous(shape)),
        "mesh_shape": list(mesh.shape), "placements": [repr(p) for p in placements]}
    if x.scales is not None:
        rows, per_row = _table_shape(code, shape)
        local_rows = x.shape[0] if len(x.shape) else 1
        table = x.scales.new_zeros(local_rows * per_row)
        table[:x.scales.numel()] = x.scales
        out["scales"] = DTensor.from_local(table.view(local_rows, per_row), mesh, placements, run_check=False,
                                           shape=(rows, per_row), stride=(per_row, 1))
    return out


def _table_shape(code: Code, shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, scales per row) of the scales table: a rank's ``r`` rows hold at most
    ``ceil(r * row / block) <= r * ceil(row / block)`` blocks."""
    rows = shape[0] if len(shape) else 1
    row = math.prod(shape[1:]) if len(shape) else 1
    return rows, -(-row // code.block)


def _precision_of(code: Code) -> str:
    return next(p for p, kinds in CODES.items() if code in kinds.values())


def _sharding(mesh_shape: Any, placements: Any) -> str:
    ranks = math.prod(mesh_shape)
    where = f"mesh {tuple(mesh_shape)}, placements {', '.join(placements)}"
    return f"{ranks} rank{'s' if ranks != 1 else ''} ({where})"


def load_entry(entry: dict[str, Any], code: Code, p: Tensor, what: str) -> LowBitState | Tensor:
    """The state ``entry`` (a ``state_dict`` entry in ``code``, of parameter ``p``) describes,
    as ``p``'s state: bit for bit where it was saved as ``p`` is sharded now; a plain (unsharded)
    entry loaded for a DTensor ``p``: decoded, as a float32 DTensor placed as ``p`` (to be
    encoded again). ValueError for a sharded entry that ``p``'s shards do not fit (``what``
    names it)."""
    if not is_dtensor(entry["codes"]):
        x = LowBitState.from_dict(entry, code, local(p).device)
        if not is_dtensor(p):
            return x
        from torch.distributed.tensor import DTensor, Replicate

        replicated = [Replicate()] * p.device_mesh.ndim
        return DTensor.from_local(x.dequantize(torch.float32), p.device_mesh, replicated,
                                  run_check=False).redistribute(p.device_mesh, p.placements)
    saved = _sharding(entry["mesh_shape"], entry["placements"])
    now = (_sharding(p.device_mesh.shape, [repr(q) for q in p.placements]) if is_dtensor(p)
           else "one process (a plain tensor)")
    if saved != now:
        raise ValueError(f"{what} is {_precision_of(code)!r} state saved sharded over {saved}, and this "
                         f"optimizer's parameter is sharded over {now}: low-bit state is quantized in blocks "
                         "of each rank's shard, so it loads only at the sharding it was saved with. Save a "
                         "full-precision checkpoint (configure(state_precision=None) before taking the state "
                         "dict), which loads at any world size, or load this one with the same ranks")
    codes = local(entry["codes"])
    shape = local(p).shape if not p.is_complex() else torch.view_as_real(local(p)).shape
    n = math.prod(shape)
    if codes.dtype != (torch.uint8 if code.bits == 4 else code.code_dtype) or codes.shape != shape:
        raise ValueError(f"{what} in code {code.name!r} needs local codes of shape {tuple(shape)}, got "
                         f"{codes.dtype} of shape {tuple(codes.shape)}")
    scales = None
    if code.scale_dtype is not None:
        scales = local(entry["scales"]).reshape(-1)[:code.scale_len(n)].to(local(p).device, copy=True)
    x = LowBitState(code, _packed(code, codes.reshape(-1).to(local(p).device)), scales, shape)
    real = torch.view_as_real(p) if p.is_complex() else p
    x.origin, x.layout = _origin(real), (real.device_mesh, tuple(real.placements), real.shape)
    return x
