"""DTensor parameters (FSDP2, tensor parallel) in code that works on plain tensors: elementwise
work runs on each rank's local shard (exact: an elementwise result of a shard is the shard of
the result), and a sum over whole tensors becomes one DTensor reduction over the mesh.

The reductions an optimizer's update may need, exact on shards and plain where nothing is a
DTensor: per-tensor norms (``full_norms``, behind ``TensorList.norm``), per-tensor sums from
local ones (``full_sums``), sums along a dim (``dim_sums``, with ``zeros_reduced`` for state
holding one), sums over blocks (``block_sums``), and elementwise work on shards that line up
(``on_shards``). Each takes a list, so that the sums of a bucket travel in one all-reduce per
mesh dim that shards them (``sum_over_meshes``) rather than one per tensor: on a slow
network, or gloo's loopback, a collective's latency is what costs. Every rank runs every
collective, an empty shard included, so the ranks stay in step."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["block_index", "block_sums", "check_blocks", "check_same_layout", "check_supported", "dim_sums",
           "full_max", "full_norms", "full_sums", "is_dtensor", "local", "local_shards", "on_shards",
           "placed_as", "reduced_placements", "reduction_key", "shards", "sum_over_meshes", "zeros_reduced"]


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


def reduction_key(x: Tensor, dim: int | None = None) -> tuple | None:
    """What a sum over ``x`` (over its dim ``dim``, if given) needs from the mesh: its mesh and
    the mesh dims that shard it (along ``dim``); None for a plain tensor. Sums over one mesh
    dim travel together (``sum_over_meshes``)."""
    if not is_dtensor(x):
        return None
    if any(p.is_partial() for p in x.placements):
        raise ValueError(f"a DTensor with unreduced (Partial) placements {x.placements}: reduce it first "
                         "(redistribute to Replicate or Shard)")
    dim = None if dim is None else dim % x.dim()
    return (x.device_mesh, tuple(d for d, p in enumerate(x.placements) if shards(p, dim)))


def sum_over_meshes(local_sums: Sequence[Tensor], keys: Sequence[tuple | None]) -> list[Tensor]:
    """Each ``local_sums[i]``, a sum over this rank's shard, added up over the mesh dims of
    ``keys[i]`` (``reduction_key``; None: taken as it is), as plain tensors of its shape. Per
    mesh, dtype and device, one all-reduce per mesh dim for all the sums over it: flattened
    into one buffer, all-reduced over that dim's process group, split back. (The ranks of one
    such group hold the same shapes: they differ only along a dim the sum runs over.) Every
    rank must pass the same keys in the same order; they come from the placements, which every
    rank shares."""
    out = list(local_sums)
    batches: dict[tuple, list[int]] = {}
    for i, (value, key) in enumerate(zip(local_sums, keys)):
        if key is not None and key[1]:
            batches.setdefault((key[0], value.dtype, value.device), []).append(i)
    for (mesh, _, _), batch in batches.items():
        for dim in range(mesh.ndim):
            idx = [i for i in batch if dim in keys[i][1]]
            if not idx:
                continue
            flat = torch.cat([out[i].reshape(-1) for i in idx])
            torch.distributed.all_reduce(flat, group=mesh.get_group(dim))
            for i, part in zip(idx, flat.split([out[i].numel() for i in idx])):
                out[i] = part.view(local_sums[i].shape)
    return out


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
    all-reduce per mesh dim: ``sum_over_meshes``, run on every rank even where
    a shard is empty, so the ranks stay in step). Plain 0-d tensors, equal on every rank."""
    return sum_over_meshes(local_sums, [reduction_key(x) for x in of])


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


def block_sums(values: Sequence[Tensor], likes: Sequence[Tensor], blocks: Sequence[int]) -> list[Tensor]:
    """For each ``i``, the sums over each of ``blocks[i]`` equal runs of consecutive entries
    (row-major) of the whole tensor ``likes[i]``, of ``values[i]``: per-entry values of
    ``likes[i]``'s local shard (e.g. a gradient's squares). Plain ``(blocks[i],)`` tensors,
    equal on every rank: each rank adds its entries into their blocks (``block_index``) and the
    ranks' sums are added up over the mesh dims that shard ``likes[i]`` (a block may span
    shards), one all-reduce per mesh dim (``sum_over_meshes``). A plain
    ``likes[i]``: ``values[i]`` summed per block."""
    sums = [v.reshape(n, -1).sum(dim=1) if not is_dtensor(like)
            else v.new_zeros(n).index_add_(0, block_index(like, n), v.reshape(-1))
            for v, like, n in zip(values, likes, blocks)]
    return sum_over_meshes(sums, [reduction_key(like) for like in likes])


def dim_sums(xs: Sequence[Tensor], dims: Sequence[int], keepdim: bool = False,
             local_sum: Callable[[Tensor, int], Tensor] | None = None) -> list[Tensor]:
    """``x.sum(dim, keepdim)`` of each whole tensor ``xs[i]`` over ``dims[i]``, or
    ``local_sum(x, dim)``, a sum over ``dim`` computed otherwise (e.g. of squares, without an
    x-sized temporary). For a DTensor: the sum over its local shard, added up over the mesh
    dims that shard ``dim`` (one all-reduce per mesh dim for all of ``xs``:
    ``sum_over_meshes``); the result is a DTensor placed as ``x`` along its other dims and
    replicated over those mesh dims (see ``reduced_placements``)."""
    if local_sum is None:
        def local_sum(t: Tensor, dim: int) -> Tensor:
            return t.sum(dim=dim, keepdim=keepdim)
    dims = [d % x.dim() for x, d in zip(xs, dims)]
    totals = sum_over_meshes([local_sum(local(x), d) for x, d in zip(xs, dims)],
                             [reduction_key(x, d) for x, d in zip(xs, dims)])
    return [_placed_reduction(total, x, d, keepdim) if is_dtensor(x) else total
            for total, x, d in zip(totals, xs, dims)]


def _placed_reduction(total: Tensor, x: Tensor, dim: int, keepdim: bool) -> Tensor:
    """``total``, this rank's part of a reduction of DTensor ``x`` over ``dim`` (summed over the
    mesh dims that shard ``dim``), as a DTensor placed by ``reduced_placements``."""
    from torch.distributed.tensor import DTensor

    shape = _reduced_shape(x.shape, dim, keepdim)
    return DTensor.from_local(total, x.device_mesh, reduced_placements(x, dim, keepdim), run_check=False,
                              shape=shape, stride=_contiguous_strides(shape))


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
    """Zeros shaped and placed as ``dim_sums([x], [dim], keepdim)[0]``: state that holds a
    reduction of ``x`` (e.g. Adafactor's row and column statistics), checkpointed as a DTensor."""
    dim %= x.dim()
    # the local shape is the local shard's, reduced (torch's DTensor factories do not place
    # _StridedShard, FSDP2's placement over tensor-parallel shards, as the parameter is placed)
    zeros = local(x).new_zeros(_reduced_shape(local(x).shape, dim, keepdim))
    return _placed_reduction(zeros, x, dim, keepdim) if is_dtensor(x) else zeros


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


def check_supported(optimizer_name: str, exact_on_shards: bool, param: Tensor,
                    on_local_shards: bool = False) -> None:
    """Refuse a DTensor parameter whose step would not be the unsharded one: an optimizer that
    needs whole tensors but does not compute over every shard, or unreduced placements; with
    ``on_local_shards`` (the update reduces, or assembles whole matrices, from the local shards
    of the parameter, its gradient and its state, which must line up), a gradient laid out
    otherwise than its parameter. (Elementwise updates run DTensor ops, which redistribute
    such a gradient themselves.)"""
    if not exact_on_shards:
        raise ValueError(f"{optimizer_name} does not support DTensor parameters (FSDP2, tensor parallel): "
                         "the registry marks it elementwise=False (its update needs whole-tensor norms or "
                         "matrix structure), it does not compute them over every shard, and a DTensor "
                         "holds only a shard")
    where = f"a DTensor parameter with placements {param.placements} on mesh {param.device_mesh}"
    if any(p.is_partial() for p in param.placements):
        raise ValueError(f"{optimizer_name} does not support {where}: Partial (unreduced) placements")
    grad = param.grad
    if on_local_shards and grad is not None and (not is_dtensor(grad) or grad.device_mesh != param.device_mesh
                                                 or tuple(grad.placements) != tuple(param.placements)):
        raise ValueError(f"{optimizer_name} does not support {where} whose gradient is "
                         f"{_layout(grad)}{f' on mesh {grad.device_mesh}' if is_dtensor(grad) else ''}: "
                         "its update works on local shards, which must line up (redistribute the gradient "
                         "to the parameter's placements)")


def check_blocks(optimizer_name: str, param: Tensor) -> None:
    """Refuse (ValueError naming the optimizer, the placements and the mesh) a DTensor whose
    local shard is not a box of the whole tensor: its entries' blocks (``block_index``) cannot
    be told from the shard's position."""
    from .distributed_matrix import local_box

    try:
        local_box(param)
    except ValueError:
        raise ValueError(f"{optimizer_name} does not support a DTensor parameter with placements "
                         f"{param.placements} on mesh {param.device_mesh} in blocks of more than one entry: "
                         "its shards are not boxes of the tensor, so the block of each entry is not known "
                         "(use partition='element', or placements that cut boxes, as FSDP2 and tensor "
                         "parallelism do)") from None


def local_shards(params: Any, grads: Any, states: dict[str, Any]) -> tuple:
    """For elementwise kernels (torch's fused ones): the lists of params, grads and states
    (a dict of lists) with each DTensor replaced by its local shard, each gradient first placed
    as its param (``placed_as``: a gradient laid out otherwise is redistributed, as DTensor ops
    would, so that the shards line up); the lists themselves where none holds a DTensor."""
    def one(xs: Any) -> Any:
        if _PLAIN.issuperset(map(type, xs)):       # no DTensor, found without a call per tensor
            return xs
        return type(xs)(local(x) for x in xs) if any(is_dtensor(x) for x in xs) else xs
    if not _PLAIN.issuperset(map(type, grads)):
        grads = type(grads)(placed_as(g, p) for g, p in zip(grads, params))
    return one(params), one(grads), {k: one(v) for k, v in states.items()}


def on_shards(fn: Callable[..., Tensor], like: Tensor, *xs: Tensor) -> Tensor:
    """``fn(*xs)``, for a DTensor ``like`` computed on the local shards of ``xs`` and placed as
    ``like``: for elementwise (broadcasting) work whose operands' shards line up with
    ``like``'s, as the row and column statistics of ``zeros_reduced`` / ``dim_sums`` do with the
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
