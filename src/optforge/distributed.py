"""DTensor parameters (FSDP2, tensor parallel) in code that works on plain tensors: elementwise
work runs on each rank's local shard (exact: an elementwise result of a shard is the shard of
the result), and a sum over whole tensors becomes one DTensor reduction over the mesh.

The reductions an optimizer's update may need, exact on shards and plain where nothing is a
DTensor: per-tensor norms (``full_norms``, behind ``TensorList.norm``), per-tensor sums from
local ones (``full_sums``), sums along a dim (``dim_sum``, with ``zeros_reduced`` for state
holding one), and elementwise work on shards that line up (``on_shards``). Every rank runs
every collective, an empty shard included, so the ranks stay in step."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["block_index", "block_sums", "check_same_layout", "check_supported", "dim_sum", "full_max",
           "full_norms", "full_sums", "global_sum",
           "is_dtensor", "local", "local_shards", "on_shards", "placed_as", "reduced_placements",
           "reduction_key", "shards", "zeros_reduced"]


_PLAIN = frozenset({Tensor, torch.nn.Parameter})


def is_dtensor(x: Tensor) -> bool:
    if type(x) in _PLAIN or not torch.distributed.is_available():
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


def shards(placement: Any, dim: int | None = None) -> bool:
    """Whether a placement shards a tensor (along ``dim``, if given). FSDP2's placement over
    tensor-parallel shards, ``_StridedShard``, shards too, though its ``is_shard()`` says not."""
    from torch.distributed.tensor.placement_types import _StridedShard

    if isinstance(placement, _StridedShard):
        return dim is None or placement.dim == dim
    return placement.is_shard(dim)


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
    partial = [Partial() if shards(p) else Replicate() for p in placements]
    return DTensor.from_local(local_sum, mesh, partial, run_check=False).full_tensor()


def full_norms(xs: Sequence[Tensor], ord: float = 2) -> list[Tensor]:
    """Each tensor's ``ord``-norm (1 or 2) over the whole tensor, as 0-d tensors. Plain tensors:
    ``torch._foreach_norm``. DTensors: the norms of their local shards, raised to ``ord`` and
    added up over the mesh (one all-reduce per layout: ``full_sums``); plain 0-d tensors, equal
    on every rank."""
    if not any(is_dtensor(x) for x in xs):
        return list(torch._foreach_norm(xs, ord))
    if ord not in (1, 2):
        raise ValueError(f"invalid ord={ord!r} for norms of DTensors: 1 and 2 are computed over the "
                         "whole tensor")
    shard_norms = torch._foreach_norm([local(x) for x in xs], ord)
    if ord == 1:
        return full_sums(shard_norms, xs)
    return list(torch._foreach_sqrt(full_sums(torch._foreach_mul(shard_norms, shard_norms), xs)))


def full_sums(local_sums: Sequence[Tensor], of: Sequence[Tensor]) -> list[Tensor]:
    """Whole-tensor sums from ``local_sums[i]``, a 0-d sum over the local shard of ``of[i]``
    (itself for a plain tensor): added up over the mesh dims that shard ``of[i]`` (one
    all-reduce per layout, run on every rank even where a shard is empty, so the ranks stay in
    step). Plain 0-d tensors, equal on every rank."""
    out = list(local_sums)
    by_key: dict[tuple, list[int]] = {}
    for i, x in enumerate(of):
        key = reduction_key(x)
        if key is not None:
            by_key.setdefault(key, []).append(i)
    for key, idx in by_key.items():
        sums = global_sum(torch.stack([local_sums[i] for i in idx]), key)
        for i, total in zip(idx, sums.unbind()):
            out[i] = total
    return out


def full_max(local_maxes: Sequence[Tensor], of: Sequence[Tensor]) -> Tensor:
    """The largest of ``local_maxes`` over every rank: ``local_maxes[i]``, a 0-d maximum over
    the local shard of ``of[i]`` (itself for a plain tensor). One all-reduce per mesh among
    the DTensors of ``of`` (a maximum needs no care for replicas); a plain 0-d tensor, equal on
    every rank."""
    from torch.distributed.tensor import DTensor, Partial

    by_mesh: dict[Any, list[Tensor]] = {}
    for value, x in zip(local_maxes, of):
        by_mesh.setdefault(x.device_mesh if is_dtensor(x) else None, []).append(value)
    maxes = []
    for mesh, values in by_mesh.items():
        value = torch.stack(values).max()
        if mesh is not None:
            partial = [Partial("max")] * mesh.ndim
            value = DTensor.from_local(value, mesh, partial, run_check=False).full_tensor()
        maxes.append(value)
    return torch.stack(maxes).max()


def block_index(like: Tensor, blocks: int) -> Tensor:
    """For each entry of DTensor ``like``'s local shard (flattened), the block it falls in when
    the whole tensor is cut into ``blocks`` equal runs of consecutive entries (row-major)."""
    from .distributed_matrix import local_box

    index = torch.zeros((), dtype=torch.long, device=local(like).device)
    stride = like.numel()
    for n, (start, stop) in zip(like.shape, local_box(like)):
        stride //= max(n, 1)
        index = index.unsqueeze(-1) + torch.arange(start, stop, device=index.device) * stride
    return index.reshape(-1).div_(like.numel() // blocks, rounding_mode="floor")


def block_sums(values: Tensor, like: Tensor, blocks: int) -> Tensor:
    """The sums, over each of ``blocks`` equal runs of consecutive entries (row-major) of the
    whole tensor ``like``, of ``values``: per-entry values of ``like``'s local shard (e.g. a
    gradient's squares). A plain ``(blocks,)`` tensor, equal on every rank: each rank adds its
    entries into their blocks (``block_index``) and one all-reduce over the mesh dims that
    shard ``like`` adds the ranks' sums up (a block may span shards). A plain ``like``:
    ``values`` summed per block."""
    if not is_dtensor(like):
        return values.reshape(blocks, -1).sum(dim=1)
    sums = values.new_zeros(blocks).index_add_(0, block_index(like, blocks), values.reshape(-1))
    return global_sum(sums, reduction_key(like))


def dim_sum(x: Tensor, dim: int, keepdim: bool = False,
            local_sum: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """``x.sum(dim, keepdim)`` of the whole tensor, or ``local_sum(x)``, a sum over ``dim``
    computed otherwise (e.g. of squares, without an x-sized temporary). For a DTensor: the sum
    over its local shard, added up over the mesh dims that shard ``dim``; the result is a
    DTensor placed as ``x`` along its other dims and replicated over those mesh dims (see
    ``reduced_placements``)."""
    if local_sum is None:
        def local_sum(t: Tensor) -> Tensor:
            return t.sum(dim=dim, keepdim=keepdim)
    if not is_dtensor(x):
        return local_sum(x)
    from torch.distributed.tensor import DTensor, Partial

    dim %= x.dim()
    out_placements = reduced_placements(x, dim, keepdim)
    summed = [Partial() if shards(p, dim) else q for p, q in zip(x.placements, out_placements)]
    shape = _reduced_shape(x.shape, dim, keepdim)
    total = DTensor.from_local(local_sum(x.to_local()), x.device_mesh, summed, run_check=False,
                               shape=shape, stride=_contiguous_strides(shape))
    return total.redistribute(x.device_mesh, out_placements) if summed != out_placements else total


def reduced_placements(x: Tensor, dim: int, keepdim: bool) -> list:
    """The placements of a reduction of DTensor ``x`` over ``dim``: replicated over the mesh
    dims that shard ``dim``, sharded as ``x`` over the others (the dims above ``dim`` shift
    down without ``keepdim``)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    dim %= x.dim()
    out = []
    for p in x.placements:
        if p.is_partial():
            reduction_key(x)                          # its ValueError names the placements
        if not shards(p) or shards(p, dim):
            out.append(Replicate())
            continue
        d = p.dim % x.dim()
        d = d if keepdim or d < dim else d - 1
        if isinstance(p, _StridedShard):
            out.append(_StridedShard(d, split_factor=p.split_factor))
        elif type(p) is Shard:
            out.append(Shard(d))
        else:
            raise ValueError(f"a DTensor with placements {x.placements} (mesh {x.device_mesh}): "
                             f"{p} is not supported in a reduction over dim {dim}")
    return out


def zeros_reduced(x: Tensor, dim: int, keepdim: bool = False) -> Tensor:
    """Zeros shaped and placed as ``dim_sum(x, dim, keepdim)``: state that holds a reduction
    of ``x`` (e.g. Adafactor's row and column statistics), checkpointed as a DTensor."""
    if not is_dtensor(x):
        return x.new_zeros(_reduced_shape(x.shape, dim % x.dim(), keepdim))
    from torch.distributed.tensor import DTensor

    # the local shape is the local shard's, reduced (torch's DTensor factories do not place
    # _StridedShard, FSDP2's placement over tensor-parallel shards, as the parameter is placed)
    shard = local(x).new_zeros(_reduced_shape(local(x).shape, dim % x.dim(), keepdim))
    shape = _reduced_shape(x.shape, dim % x.dim(), keepdim)
    return DTensor.from_local(shard, x.device_mesh, reduced_placements(x, dim, keepdim), run_check=False,
                              shape=shape, stride=_contiguous_strides(shape))


def _reduced_shape(shape: Sequence[int], dim: int, keepdim: bool) -> tuple[int, ...]:
    shape = list(shape)
    if keepdim:
        shape[dim] = 1
    else:
        del shape[dim]
    return tuple(shape)


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def check_supported(optimizer_name: str, exact_on_shards: bool, param: Tensor) -> None:
    """Refuse a DTensor parameter whose step would not be the unsharded one: an optimizer that
    needs whole tensors but does not compute over every shard, or unreduced placements."""
    if not exact_on_shards:
        raise ValueError(f"{optimizer_name} does not support DTensor parameters (FSDP2, tensor parallel): "
                         "the registry marks it elementwise=False (its update needs whole-tensor norms or "
                         "matrix structure), it does not compute them over every shard, and a DTensor "
                         "holds only a shard")
    if any(p.is_partial() for p in param.placements):
        raise ValueError(f"{optimizer_name} does not support a DTensor parameter with placements "
                         f"{param.placements} on mesh {param.device_mesh}: Partial (unreduced) placements")


def local_shards(*lists: Any) -> tuple:
    """Lists of tensors (and dicts of them) with each DTensor replaced by its local shard, for
    elementwise kernels (torch's fused ones); the lists themselves where none holds a DTensor."""
    def one(xs: Any) -> Any:
        if isinstance(xs, dict):
            return {k: one(v) for k, v in xs.items()}
        if _PLAIN.issuperset(map(type, xs)):       # no DTensor, found without a call per tensor
            return xs
        return type(xs)(local(x) for x in xs) if any(is_dtensor(x) for x in xs) else xs
    return tuple(one(xs) for xs in lists)


def on_shards(fn: Callable[..., Tensor], like: Tensor, *xs: Tensor) -> Tensor:
    """``fn(*xs)``, for a DTensor ``like`` computed on the local shards of ``xs`` and placed as
    ``like``: for elementwise (broadcasting) work whose operands' shards line up with
    ``like``'s, as the row and column statistics of ``zeros_reduced`` / ``dim_sum`` do with the
    tensor they reduce (sharded as it, or replicated where it is sharded along the reduced dim)."""
    if not is_dtensor(like):
        return fn(*xs)
    from torch.distributed.tensor import DTensor

    out = fn(*(local(x) for x in xs))
    return DTensor.from_local(out, like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())


def placed_as(x: Tensor, like: Tensor) -> Tensor:
    """DTensor ``x`` redistributed to ``like``'s placements where they differ (so that their
    local shards line up); anything else as it is."""
    if is_dtensor(x) and is_dtensor(like) and tuple(x.placements) != tuple(like.placements):
        return x.redistribute(like.device_mesh, like.placements)
    return x
