"""Reused buffers for the large temporaries of an eager optimizer step on CPU.

Why: glibc serves every allocation above its mmap threshold (at most 32 MiB on 64-bit) with a
fresh ``mmap``, and torch's CPU allocator caches nothing, so each parameter-sized temporary of a
large tensor is paid in page faults: on a 2-core CPU, ``v.sqrt()`` of a 128 MiB tensor takes
~42 ms into a new tensor and ~7 ms into an existing one. Foreach ops have no ``out=``.

What: during an eager :meth:`optforge.Optimizer.step`, the out-of-place :class:`TensorList`
methods (``sqrt``, ``add``, ``mul``, ``clone``, ...) write the results of contiguous CPU tensors
of at least :data:`MIN_BYTES` into buffers of this optimizer's :class:`ScratchPool` (with
per-tensor ``torch.<op>(..., out=buffer)``); smaller tensors keep foreach and the heap. The
eager low-bit step takes its chunk buffers from the same pool (:mod:`optforge.lowbit.buffers`).

- A buffer is reused only when no tensor refers to its memory any more (the storage's use
  count is back to the pool's own references): a temporary still alive, a view of it, or one
  that an update kept (e.g. stored in its state) is never written into.
- Memory held between steps: the buffers of the large temporaries alive at the same time
  during the last step (as CUDA's caching allocator keeps a step's peak), but at most one per
  parameter of the buffer's shape (at least one per shape): for temporaries shaped like
  float32 parameters, at most 4 bytes per parameter. At the end of each step the pool drops
  the buffers that step did not use, those still referenced, and those beyond that limit (an
  update with two parameter-sized temporaries at once allocates the second one again each
  step).
  :func:`release` frees them all now (the next step allocates again); :func:`held_bytes` says
  how much is held. Setting ``optforge.scratch.MIN_BYTES = None`` turns pooling off.
- Never used for CUDA tensors (the caching allocator already reuses memory), tensor subclasses
  (DTensor), or the fused path (``torch.compile`` plans its own buffers): the pool is active
  only inside an eager step, and only while not compiling.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["MIN_BYTES", "ScratchPool", "held_bytes", "release", "using"]

#: Tensors this large or larger get pooled temporaries: glibc's largest mmap threshold
#: (DEFAULT_MMAP_THRESHOLD_MAX, 64-bit). Below it, freed memory is reused by the heap anyway.
#: None turns the pool off.
MIN_BYTES: int | None = 32 * 2**20

_PLAIN = (Tensor, torch.nn.Parameter)
_ATTR = "_optforge_scratch"     # where an optimizer keeps its pool (not saved in state_dict)
_local = threading.local()


def _use_count(storage: torch.UntypedStorage) -> int:
    return torch._C._storage_Use_Count(storage._cdata)


class _Buffer:
    __slots__ = ("tensor", "storage", "idle_count", "used")

    def __init__(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> None:
        self.tensor = torch.empty(shape, dtype=dtype, device=device)
        self.storage = self.tensor.untyped_storage()
        self.idle_count = _use_count(self.storage)   # the pool's own references
        self.used = False

    def is_free(self) -> bool:
        return _use_count(self.storage) == self.idle_count


class ScratchPool:
    """One optimizer's reusable buffers, by (shape, dtype, device)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, list[_Buffer]] = {}

    @staticmethod
    def pooled(tensors: list[Tensor]) -> list[int]:
        """The indices of the tensors whose out-of-place results (same shape and dtype) should
        be pooled: contiguous plain CPU tensors of at least MIN_BYTES."""
        if MIN_BYTES is None:
            return []
        try:
            big = [i for i, t in enumerate(tensors) if t.nbytes >= MIN_BYTES]   # cheap test first
        except RuntimeError:   # a sparse tensor (no nbytes): never pooled
            big = [i for i, t in enumerate(tensors) if t.layout == torch.strided and t.nbytes >= MIN_BYTES]
        return [i for i in big if type(tensors[i]) in _PLAIN and tensors[i].device.type == "cpu"
                and tensors[i].is_contiguous()]

    def take(self, like: Tensor) -> Tensor:
        """A contiguous tensor shaped like ``like`` whose memory nothing else refers to (its
        contents are arbitrary): a free buffer of the pool, or a new one."""
        return self.take_new(like.shape, like.dtype, like.device)

    def take_new(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
        """:meth:`take` of a tensor of this shape, dtype and device."""
        key = (torch.Size(shape), dtype, device)
        buffers = self._buffers.setdefault(key, [])
        buf = next((b for b in buffers if b.is_free()), None)
        if buf is None:
            buf = _Buffer(*key)
            buffers.append(buf)
        buf.used = True
        return buf.tensor.detach()   # a new tensor on the buffer's memory: it counts as a use

    def trim(self, params_shaped: Callable[[torch.Size], int] | None = None) -> None:
        """End of a step: keep the buffers it used that nothing refers to any more; of those of
        at least MIN_BYTES, at most ``params_shaped(shape)`` (at least one) of each shape."""
        for key in list(self._buffers):
            kept = [b for b in self._buffers[key] if b.used and b.is_free()]
            if (len(kept) > 1 and params_shaped is not None and MIN_BYTES is not None
                    and kept[0].storage.nbytes() >= MIN_BYTES):
                del kept[max(1, params_shaped(key[0])):]
            for b in kept:
                b.used = False
            if kept:
                self._buffers[key] = kept
            else:
                del self._buffers[key]

    def nbytes(self) -> int:
        return sum(b.storage.nbytes() for bs in self._buffers.values() for b in bs)


def active() -> ScratchPool | None:
    """The pool of the eager step running in this thread, if any."""
    return getattr(_local, "pool", None)


@contextlib.contextmanager
def using(owner: Any) -> Iterator[None]:
    """Run an eager step with ``owner``'s pool (created on first use, kept on ``owner``)."""
    if MIN_BYTES is None or torch.compiler.is_compiling():
        yield
        return
    pool = owner.__dict__.get(_ATTR)
    if pool is None:
        pool = owner.__dict__[_ATTR] = ScratchPool()
    outer = active()
    _local.pool = pool
    try:
        yield
    finally:
        _local.pool = outer
        pool.trim(_shape_counter(owner))


def _shape_counter(owner: Any) -> Callable[[torch.Size], int] | None:
    """How many of ``owner``'s parameters have a shape (counted on first use), or None if it
    has no ``param_groups``."""
    groups = getattr(owner, "param_groups", None)
    if groups is None:
        return None
    counts: Counter[torch.Size] | None = None

    def count(shape: torch.Size) -> int:
        nonlocal counts
        if counts is None:
            counts = Counter(p.shape for group in groups for p in group["params"])
        return counts[shape]
    return count


def release(owner: Any) -> None:
    """Free the buffers ``owner`` (an optimizer) holds; its next step allocates them again."""
    owner.__dict__.pop(_ATTR, None)


def held_bytes(owner: Any) -> int:
    """Bytes of scratch buffers ``owner`` holds between steps."""
    pool = owner.__dict__.get(_ATTR)
    return 0 if pool is None else pool.nbytes()
