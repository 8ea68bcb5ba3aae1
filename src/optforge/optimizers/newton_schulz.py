"""Newton-Schulz orthogonalization of a matrix or a stack of matrices (Muon's iteration), with
its iterates optionally written into a caller's reusable buffer."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["NS_COEFFICIENTS", "Slots", "iterate_bytes", "orthogonalize", "round_up", "work_bytes"]

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)    # Jordan's quintic: maximal slope at zero
_ALIGN = 64                                     # bytes: each slot of a work buffer starts on a cache line


def _slot_shapes(shape: tuple[int, ...], in_place: bool) -> list[tuple[int, ...]]:
    """The tensors the iteration writes: X_0 (unless normalized in place), the other iterate
    (the two alternate), A and b A + c A^2."""
    *batch, rows, cols = shape
    small = min(rows, cols)
    iterates = [tuple(shape)] * (1 if in_place else 2)
    return iterates + [(*batch, small, small)] * 2


def round_up(nbytes: int) -> int:
    """``nbytes`` rounded up to a whole slot of a work buffer (:class:`Slots`)."""
    return -(-nbytes // _ALIGN) * _ALIGN


def work_bytes(shape: tuple[int, ...], dtype: torch.dtype, in_place: bool = False) -> int:
    """Bytes of the ``work`` buffer :func:`orthogonalize` takes for an input of ``shape``
    (rows, cols) or (B, rows, cols) iterated in ``dtype``; ``in_place``: with ``overwrite=True``
    on a contiguous input already in ``dtype`` (its memory holds the first iterate)."""
    return sum(round_up(math.prod(s) * dtype.itemsize) for s in _slot_shapes(shape, in_place))


def iterate_bytes(shape: tuple[int, ...], dtype: torch.dtype, in_place: bool = False) -> int:
    """The leading bytes of that buffer, which hold the iterates (the result among them); the
    rest holds A and b A + c A^2 only while :func:`orthogonalize` runs: a caller may use it
    before and after."""
    return sum(round_up(math.prod(s) * dtype.itemsize) for s in _slot_shapes(shape, in_place)[:-2])


class Slots:
    """Consecutive views of a flat byte buffer (each aligned to a cache line), or new tensors
    when there is none."""

    def __init__(self, work: Tensor | None, dtype: torch.dtype, device: torch.device) -> None:
        if work is not None and (work.dtype != torch.uint8 or work.dim() != 1 or work.device != device):
            raise TypeError(f"orthogonalize: work must be a 1-D uint8 tensor on {device}, got a "
                            f"{work.dim()}-D {work.dtype} tensor on {work.device}")
        self.work, self.dtype, self.device, self.offset = work, dtype, device, 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> Tensor:
        """The next slot, of ``shape`` and ``dtype`` (default: the one given at creation)."""
        dtype = dtype or self.dtype
        if self.work is None:
            return torch.empty(shape, dtype=dtype, device=self.device)
        nbytes = math.prod(shape) * dtype.itemsize
        if self.offset + nbytes > self.work.numel():
            raise ValueError(f"orthogonalize: a work buffer of {self.work.numel()} bytes is too small "
                             f"for an input of this shape: see work_bytes()")
        view = self.work[self.offset:self.offset + nbytes].view(dtype).view(shape)
        self.offset += round_up(nbytes)
        return view

    def skip(self, nbytes: int) -> None:
        """Leave ``nbytes`` (a multiple of the alignment) before the next slot."""
        self.offset += nbytes

    def rest(self) -> Tensor | None:
        """The buffer after the slots taken so far (None without a buffer)."""
        return None if self.work is None else self.work[self.offset:]


def orthogonalize(x: Tensor, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  steps: int = 5, eps: float = 1e-7, dtype: torch.dtype | None = torch.bfloat16, *,
                  add_eps: bool = False, overwrite: bool = False, work: Tensor | None = None) -> Tensor:
    r"""Approximate :math:`UV^\top` of a matrix :math:`X = USV^\top` by ``steps`` quintic
    Newton-Schulz iterations (Jordan, 2024), computed in ``dtype`` (None: ``x``'s dtype):

    .. math::
        X_0 = X / \max(\lVert X \rVert_F, \epsilon), \qquad
        A = X_k X_k^\top, \qquad X_{k+1} = a X_k + (b A + c A^2) X_k

    run on the wide orientation (:math:`X^\top` when rows > columns, so :math:`A` is the small
    Gram matrix). The coefficients push singular values into roughly [0.7, 1.2] rather than to
    exactly 1, which does not hurt training. ``x`` may be a stack of matrices (B, rows, cols).
    ``add_eps``: :math:`X_0 = X / (\lVert X \rVert_F + \epsilon)` instead (Jordan's original
    code; torch's clamps). ``overwrite``: ``x`` (already in ``dtype``, contiguous) may be
    normalized in place and its memory reused for the iterates. ``work``: a 1-D uint8 tensor
    on ``x``'s device of at least :func:`work_bytes` bytes, which the iterates are written into
    instead of new tensors (a buffer kept across calls saves allocating, and page-faulting,
    fresh memory each time); without it they are allocated once per call. Returns a tensor in
    ``dtype`` (a view of ``work``, or with ``overwrite`` possibly of ``x``); for a stack,
    contiguous also when tall (its last step is computed transposed), so that adding it to the
    parameters reads it in order. A single matrix keeps torch's operations, in bf16 bit for
    bit."""
    a, b, c = coefficients
    dtype = dtype or x.dtype
    tall, stacked = x.size(-2) > x.size(-1), x.dim() == 3
    *batch, rows, cols = x.mT.shape if tall else x.shape           # the wide orientation
    slots = Slots(work, dtype, x.device)
    in_place = overwrite and x.dtype == dtype and x.is_contiguous()
    # the two iterates alternate between these (in x's orientation), then A and b A + c A^2
    iterates = [x if in_place else slots.take(tuple(x.shape)), slots.take(tuple(x.shape))]
    gram, poly = slots.take((*batch, rows, rows)), slots.take((*batch, rows, rows))
    if x.dtype != dtype:
        x = iterates[0].copy_(x)                                     # rounded first, as torch's
    y = x.mT if tall else x
    norm = y.norm(dim=(-2, -1), keepdim=True) if stacked else y.norm()   # one norm per matrix
    # spectral norm <= Frobenius norm <= 1 (eps = 0: the smallest normal, so 0 stays 0)
    norm = norm + eps if add_eps else norm.clamp(min=eps or torch.finfo(dtype).tiny)
    y = torch.div(y, norm, out=iterates[0].mT if tall else iterates[0])
    mm, matmul = (torch.baddbmm, torch.bmm) if stacked else (torch.addmm, torch.mm)
    for k in range(steps):
        out = iterates[(k + 1) % 2]
        matmul(y, y.mT, out=gram)                                    # A = X X^T
        mm(gram, gram, gram, beta=b, alpha=c, out=poly)              # b A + c A^2
        if tall and k == steps - 1 and stacked:      # (a X + poly X)^T = a X^T + X^T poly
            return mm(y.mT, y.mT, poly, beta=a, out=out)             # (poly is symmetric), contiguous
        y = mm(y, poly, y, beta=a, out=out.view(*batch, rows, cols))  # a X + (b A + c A^2) X
    return y.mT if tall else y
