"""DTensor parameters (FSDP2, tensor parallel) in code that works on plain tensors: elementwise
work runs on each rank's local shard (exact: an elementwise result of a shard is the shard of
the result), and a sum over whole tensors becomes one DTensor reduction over the mesh."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_same_layout", "global_sum", "is_dtensor", "local", "reduction_key"]


def is_dtensor(x: Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


def local(x: Tensor) -> Tensor:
    """A DTensor's local shard (a view of it: in-place changes reach the DTensor); a plain
    tensor itself."""
    return x.to_local() if is_dtensor(x) else x


def check_same_layout(x: Tensor, *others: Tensor) -> None:
    """Refuse tensors whose local shards would not line up with ``x``'s (another mesh or other
    placements, or a plain tensor beside a DTensor)."""
    for y in others:
        if is_dtensor(x) != is_dtensor(y) or (is_dtensor(x) and (
                y.device_mesh != x.device_mesh or y.placements != x.placements)):
            raise ValueError(f"a tensor laid out as {_layout(y)} beside one laid out as {_layout(x)} "
                             f"(shape {tuple(x.shape)}): their local shards do not line up")


def _layout(x: Tensor) -> str:
    return f"a DTensor with placements {x.placements}" if is_dtensor(x) else "a plain tensor"


def reduction_key(x: Tensor) -> tuple | None:
    """What a sum over ``x`` needs from the mesh (its mesh and placements; None for a plain
    tensor): tensors with one key share one reduction."""
    if not is_dtensor(x):
        return None
    if any(p.is_partial() for p in x.placements):
        raise ValueError(f"a DTensor with unreduced (Partial) placements {x.placements}: reduce it first "
                         "(redistribute to Replicate or Shard)")
    return (x.device_mesh, tuple(x.placements))


def global_sum(local_sum: Tensor, key: tuple | None) -> Tensor:
    """The sum over whole tensors of ``reduction_key`` ``key``, from ``local_sum``, the sum over
    this rank's local shards: added up over the mesh dims they are sharded on, taken as it is
    over those they are replicated on. One all-reduce; a plain 0-d tensor on every rank."""
    if key is None:
        return local_sum
    from torch.distributed.tensor import DTensor, Partial, Replicate

    mesh, placements = key
    partial = [Partial() if p.is_shard() else Replicate() for p in placements]
    return DTensor.from_local(local_sum, mesh, partial, run_check=False).full_tensor()
