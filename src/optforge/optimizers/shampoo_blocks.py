"""Shampoo's blocks: how a tensor is cut, its factors' layout, and the plan that batches the
blocks of one shape across the tensors of a bucket."""

from __future__ import annotations

import functools
import itertools
import operator
from typing import NamedTuple

import torch
from torch import Tensor

from ..precision import LOW_PRECISION

__all__ = ["BlockPlan", "Blocks", "gather", "inverse_root", "merged_shape", "precondition", "scatter"]


def merged_shape(shape: tuple[int, ...], max_dim: int) -> tuple[int, ...]:
    """Their ``merge_small_dims``: dims of size 1 dropped, then neighbouring dims multiplied
    together from the last one while the product stays <= ``max_dim``: with ``max_dim`` 1024
    a (64, 3, 3, 3) kernel becomes (64, 27) (64 * 27 > 1024), a (5, 48) matrix (240,), a
    0-dim tensor (1,)."""
    if 0 in shape:
        return (0,)
    dims = [d for d in reversed(shape) if d != 1] or [1]
    out = [dims[0]]
    for d in dims[1:]:
        if out[-1] * d <= max_dim:
            out[-1] *= d
        else:
            out.append(d)
    return tuple(reversed(out))


class Blocks(NamedTuple):
    """How a parameter is preconditioned: viewed as ``shape`` (merged dims), cut into blocks of
    at most ``max_dim`` along every dim, row-major. Blocks of one shape form a group
    (``groups``: block dims, their slices), whose factors are batched: one (n, d, d) tensor
    per block dim."""

    shape: tuple[int, ...]
    groups: tuple[tuple[tuple[int, ...], tuple[tuple[slice, ...], ...]], ...]

    @classmethod
    @functools.cache
    def of(cls, param_shape: tuple[int, ...], max_dim: int) -> Blocks:
        shape = merged_shape(tuple(param_shape), max_dim)
        by_dims: dict[tuple[int, ...], list[tuple[slice, ...]]] = {}
        for corner in itertools.product(*[range(0, d, max_dim) for d in shape]):
            block = tuple(slice(s, min(s + max_dim, d)) for s, d in zip(corner, shape))
            by_dims.setdefault(tuple(s.stop - s.start for s in block), []).append(block)
        return cls(shape, tuple((dims, tuple(slices)) for dims, slices in by_dims.items()))

    @property
    def factor_numel(self) -> int:
        return sum(len(slices) * d * d for dims, slices in self.groups for d in dims)

    def matrices(self, flat: Tensor) -> list[list[Tensor]]:
        """Views of a flat state tensor as each group's (n, d, d) factors, one per block dim."""
        out, at = [], 0
        for dims, slices in self.groups:
            out.append([])
            for d in dims:
                out[-1].append(flat[at:at + len(slices) * d * d].view(len(slices), d, d))
                at += len(slices) * d * d
        return out


def gather(x: Tensor, slices: tuple[tuple[slice, ...], ...]) -> Tensor:
    """The blocks of ``x`` at ``slices``, stacked (read only: a view when there is one block, or
    when they are the consecutive equal blocks of a vector)."""
    if len(slices) == 1:
        return x[slices[0]].unsqueeze(0)
    if x.dim() == 1:
        return x[slices[0][0].start:slices[-1][0].stop].reshape(len(slices), -1)
    return torch.stack([x[s] for s in slices])


def scatter(out: Tensor, slices: tuple[tuple[slice, ...], ...], blocks: Tensor) -> None:
    """Write stacked ``blocks`` into ``out`` at ``slices`` (the inverse of :func:`gather`)."""
    if out.dim() == 1:
        out[slices[0][0].start:slices[-1][0].stop] = blocks.reshape(-1)
        return
    for s, block in zip(slices, blocks):
        out[s] = block


def inverse_root(matrix: Tensor, root: float, epsilon: float) -> Tensor:
    r""":math:`(A + \epsilon I)^{-1/r}` of each matrix of a batch, by eigendecomposition, as
    their default ``EigenConfig``: eigh of :math:`A + \epsilon I` (retried in float64 if it
    fails), and where the smallest eigenvalue :math:`\lambda_{min}` is below :math:`\epsilon`
    (A is not positive definite in floating point), every eigenvalue of that matrix shifted by
    :math:`\epsilon - \lambda_{min}`."""
    dtype = matrix.dtype
    if dtype in LOW_PRECISION:                      # eigh has no bf16 / fp16 kernels
        matrix = matrix.float()
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    ridged = matrix.add(eye, alpha=epsilon)
    try:
        lam, q = torch.linalg.eigh(ridged)
    except RuntimeError:
        if ridged.dtype == torch.float64:
            raise
        lam, q = (x.to(ridged.dtype) for x in torch.linalg.eigh(ridged.double()))
    low = lam.amin(-1, keepdim=True)
    lam = torch.where(low < epsilon, lam - low + epsilon, lam)
    return (q * lam.pow(-1.0 / root).unsqueeze(-2) @ q.transpose(-2, -1)).to(dtype)


def precondition(blocks: Tensor, roots: list[Tensor]) -> Tensor:
    r""":math:`G \times_1 X_1 \cdots \times_k X_k` for a batch of blocks (n, d_1, ..., d_k), in
    the factors' dtype: each step contracts the leading block dim and appends the result as the
    last (the X are symmetric)."""
    y = blocks
    for x in roots:
        n, d = y.shape[:2]
        rest = y.shape[2:]
        y = (y.to(x.dtype).reshape(n, d, -1).transpose(1, 2) @ x).reshape(n, *rest, x.shape[-1])
    return y.to(blocks.dtype)



class Member(NamedTuple):
    """One tensor's blocks of a shape: its index, their slices, their factors' and inverse
    roots' (n, d, d) views (one per block dim)."""

    tensor: int
    slices: tuple[tuple[slice, ...], ...]
    factors: list[Tensor]
    roots: list[Tensor]


class BlockGroup:
    """Every block of one shape (``dims``) across a list of tensors, in tensor order, with the
    lists of their factors and inverse roots (one per block dim). ``whole``: the tensors' own
    shape when every member is one whole tensor of that shape (the common case: the blocks are
    the tensors, stacked without slicing); else None."""

    def __init__(self, dims: tuple[int, ...], members: list[Member], whole: tuple[int, ...] | None) -> None:
        self.dims, self.members, self.whole = dims, members, whole
        self.tensors = [m.tensor for m in members]
        self.factors = [[m.factors[k] for m in members] for k in range(len(dims))]
        self.roots = [[m.roots[k] for m in members] for k in range(len(dims))]

    def stack(self, xs: list[Tensor], merged: list[tuple[int, ...]], members: list[Member]) -> Tensor:
        """The blocks of the tensors ``xs`` (``merged``: their blocked shapes) at the members'
        slices, stacked (read only: may be a view)."""
        if self.whole is not None:
            index = self.tensors if members is self.members else [m.tensor for m in members]
            return torch.stack([xs[j] for j in index]).view(len(members), *self.dims)
        parts = [gather(xs[m.tensor].reshape(merged[m.tensor]), m.slices) for m in members]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def split(self, stacked: Tensor, members: list[Member]) -> list[Tensor]:
        """``stacked`` cut into the members' parts: their blocks (a whole tensor in its own
        shape)."""
        if self.whole is not None:
            return list(stacked.view(len(members), *self.whole).unbind(0))
        return _split(stacked, members)


class BlockPlan:
    """The blocks of a list of tensors, grouped by shape across the tensors, with views of each
    block's factors and inverse roots: built once for a bucket, kept while its state tensors
    are the same objects (``load_state_dict`` replaces them)."""

    def __init__(self, shapes: list[tuple[int, ...]], factors: list[Tensor], roots: list[Tensor],
                 max_dim: int) -> None:
        self.factors, self.roots = factors, roots
        self.blocks = [Blocks.of(shape, max_dim) for shape in shapes]
        self.merged = [b.shape for b in self.blocks]
        by_dims: dict[tuple[int, ...], list[Member]] = {}
        for j, (blocks, f, r) in enumerate(zip(self.blocks, factors, roots)):
            for (dims, slices), fs, rs in zip(blocks.groups, blocks.matrices(f), blocks.matrices(r)):
                by_dims.setdefault(dims, []).append(Member(j, slices, fs, rs))
        self.groups = []
        for dims, members in by_dims.items():
            own = {shapes[m.tensor] for m in members}
            whole = len(own) == 1 and all(len(self.blocks[m.tensor].groups) == 1 and len(m.slices) == 1
                                          for m in members)
            self.groups.append(BlockGroup(dims, members, own.pop() if whole else None))

    def holds(self, factors: list[Tensor], roots: list[Tensor]) -> bool:
        return (len(factors) == len(self.factors) and all(map(operator.is_, factors, self.factors))
                and all(map(operator.is_, roots, self.roots)))

    def accumulate(self, grads: list[Tensor], beta2: float) -> None:
        r""":math:`L_k \leftarrow \beta_2 L_k + (1 - \beta_2) G_{(k)} G_{(k)}^\top` for every
        block dim of every block, one batched matmul per block shape and dim (:math:`\beta_2 = 1`:
        a plain sum, as theirs)."""
        for group in self.groups:
            blocks = group.stack(grads, self.merged, group.members)
            n = blocks.shape[0]
            for k, d in enumerate(group.dims):
                unfolded = blocks.movedim(k + 1, 1).reshape(n, d, -1)        # G_(k)
                outer = unfolded @ unfolded.transpose(1, 2)
                if beta2 != 1:
                    torch._foreach_mul_(group.factors[k], beta2)
                parts = outer.unbind(0) if group.whole is not None else _split(outer, group.members)
                torch._foreach_add_(group.factors[k], parts, alpha=1 - beta2 if beta2 != 1 else 1.0)

    def refresh_roots(self, due: list[bool], bc2: list[float], epsilon: float) -> None:
        r""":math:`X_k = (L_k / bc_2 + \epsilon I)^{-1/(2o)}` for the blocks of the tensors that are
        ``due``, one batched eigendecomposition per block shape and dim (``bc2``: each tensor's
        bias correction)."""
        for group in self.groups:
            members = [m for m in group.members if due[m.tensor]]
            if not members:
                continue
            for k in range(len(group.dims)):
                scaled = torch.cat([m.factors[k] / bc2[m.tensor] for m in members])
                roots = inverse_root(scaled, 2 * len(group.dims), epsilon)
                torch._foreach_copy_([m.roots[k] for m in members], _split(roots, members))

    def directions(self, g_bar: list[Tensor], graft: list[Tensor] | None,
                   skip: list[bool]) -> list[Tensor | None]:
        r"""Each tensor's :math:`P = \bar G \times_1 X_1 \cdots \times_o X_o`, block by block, with
        the norm of the grafted direction's block where there is one; None where ``skip``."""
        out: list[Tensor | None] = [None] * len(g_bar)
        cut: list[int] = []
        for group in self.groups:
            members = [m for m in group.members if not skip[m.tensor]] if any(skip) else group.members
            if not members:
                continue
            everyone = len(members) == len(group.members)
            roots = [group.roots[k] if everyone else [m.roots[k] for m in members]
                     for k in range(len(group.dims))]
            roots = [rs[0] if len(rs) == 1 else torch.cat(rs) for rs in roots]     # (n, d, d) each
            d = precondition(group.stack(g_bar, self.merged, members), roots)
            if graft is not None:                                   # D = |A| / (|P| + 1e-16) P
                a = group.stack(graft, self.merged, members)
                ratio = a.flatten(1).norm(dim=1) / (d.flatten(1).norm(dim=1) + 1e-16)
                d.mul_(ratio.view(-1, *[1] * len(group.dims)))
            if group.whole is not None:
                for j, part in zip(group.tensors if everyone else [m.tensor for m in members],
                                   group.split(d, members)):
                    out[j] = part
                continue
            for m, part in zip(members, group.split(d, members)):
                if out[m.tensor] is None:
                    out[m.tensor] = torch.empty(self.merged[m.tensor], dtype=part.dtype, device=part.device)
                    cut.append(m.tensor)
                scatter(out[m.tensor], m.slices, part)
        for j in cut:                                               # assembled in blocked shape
            out[j] = out[j].view(g_bar[j].shape)
        return out


def _split(stacked: Tensor, members: list[Member]) -> list[Tensor]:
    """``stacked`` cut into the members' consecutive parts (n blocks each)."""
    return list(stacked.split([len(m.slices) for m in members]))
