"""The eager step of a large CPU bucket, run over cache-sized chunks of its entries.

Why: the eager path runs an update as one foreach kernel per line, each a pass over every
tensor of the bucket. Once the bucket outgrows the CPU's caches, every one of those passes
goes to main memory: an Adam step reads and writes 2.4x the bytes of one pass over its
operands, Adan's 3.2x, and each out-of-place line allocates a parameter-sized temporary.

What: for an optimizer whose update is elementwise (registered ``elementwise=True`` and written
as ``scalars()`` + ``kernel()``, the same requirement as low-bit state, or declaring its
``update`` one with ``elementwise_update = True``), the whole update
(maximize and weight decay included) runs on one chunk at a time: a few whole tensors, or
slices of a large contiguous one, of about :data:`CHUNK` entries. The next line of the update
then finds the chunk's operands in cache, so main-memory traffic approaches one read of each
operand and one write of each result, and temporaries are chunk-sized (the step holds no
parameter-sized scratch). An elementwise update gives the same numbers on any split of its
tensors; the step counts advance and the gradient transforms run once over the whole bucket.

The chunks run one after another, each op on torch's threads. With
``optforge.chunk_threads.STEP_THREADS`` (or ``OPTFORGE_STEP_THREADS=1``) they are shared among
``torch.get_num_threads()`` worker threads instead (at most 8), each running its chunks' ops
on one thread: on a CPU shared with busy processes, where each short OpenMP region waits for
descheduled threads, that was 3-25x faster; on a quiet 2-core CPU 1.13-1.37x slower.
``CHUNK = None`` runs buckets whole.

Buckets of at most :data:`CHUNK` entries run whole (one chunk is the whole bucket). Not
chunked: CUDA buckets (foreach kernels there do not go through the CPU's caches, and each chunk
would cost launches), DTensor, sparse, low-precision (``fp32_state``/``stochastic_rounding``)
and low-bit buckets, and optimizers that override ``prepare`` or ``finish``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from . import chunk_threads
from .steps import advance_steps
from .tensorlist import TensorList
from .weight_decay import apply_weight_decay

__all__ = ["CHUNK", "applies", "chunked_class", "chunks", "step"]

#: Entries per chunk (None: never chunk): 1 MiB per float32 operand, so an update's operands
#: and temporaries fit in a 2 MiB L2 plus a share of L3. Chosen by measurement
#: (``benchmarks/pass_counts.py --time``, docs/benchmarks.md).
CHUNK: int | None = 1 << 18

_PLAIN = (Tensor, torch.nn.Parameter)
_ELIGIBLE: dict[type, bool] = {}

Piece = tuple[int, int, int]      # (tensor index in the bucket, first entry, end entry)


def chunked_class(cls: type) -> bool:
    """Whether optimizer class ``cls`` runs its large CPU buckets' eager steps chunk by chunk."""
    from .base import Optimizer, _registered_elementwise  # base imports this module

    return ((cls.has_kernel() or cls.elementwise_update) and _registered_elementwise(cls)
            and cls.prepare is Optimizer.prepare and cls.finish is Optimizer.finish)


def applies(opt: Any, group: dict[str, Any], b: Any) -> bool:
    """Whether bucket ``b`` of ``group`` runs its eager step chunk by chunk."""
    size = CHUNK
    if size is None or b.sparse or b.low_precision or len(b.key) != 2 or b.key[0].type != "cpu":
        return False
    cls = type(opt)
    eligible = _ELIGIBLE.get(cls)
    if eligible is None:
        eligible = _ELIGIBLE[cls] = chunked_class(cls)
    if not eligible or sum(map(Tensor.numel, b.p)) <= size:
        return False
    return all(type(p) in _PLAIN for p in b.params)


def _splittable(i: int, p: Sequence[Tensor], g: Sequence[Tensor], s: dict[str, Sequence[Any]]) -> bool:
    """Whether tensor i's operands can be cut into flat slices alike: contiguous, same entries."""
    x, n = p[i], p[i].numel()
    return (x.is_contiguous() and g[i].is_contiguous() and g[i].numel() == n
            and all(isinstance(xs[i], Tensor) and xs[i].is_contiguous() and xs[i].numel() == n
                    for xs in s.values()))


def chunks(p: Sequence[Tensor], g: Sequence[Tensor], s: dict[str, Sequence[Any]],
           size: int) -> Iterator[list[Piece]]:
    """The bucket's entries in chunks of about ``size`` (:func:`group_pieces`)."""
    return group_pieces([x.numel() for x in p], lambda i: _splittable(i, p, g, s), size)


def group_pieces(numels: Sequence[int], splittable: Callable[[int], bool],
                 size: int) -> Iterator[list[Piece]]:
    """Entries of tensors of ``numels`` entries in chunks of about ``size``: small tensors
    grouped whole, larger ones that ``splittable(i)`` cut at multiples of ``size`` (the others
    whole)."""
    chunk: list[Piece] = []
    filled = 0
    for i, n in enumerate(numels):
        if n > size and splittable(i):
            cuts = [(start, min(start + size, n)) for start in range(0, n, size)]
        else:
            cuts = [(0, n)]
        for start, stop in cuts:
            chunk.append((i, start, stop))
            filled += stop - start
            if filled >= size:
                yield chunk
                chunk, filled = [], 0
    if chunk:
        yield chunk


def _cuts(xs: Sequence[Tensor], chunk: list[Piece], whole: list[bool]) -> TensorList:
    return TensorList(x if w else x.view(-1)[start:stop] for x, (_, start, stop), w in
                      zip((xs[i] for i, _, _ in chunk), chunk, whole))


def _pick(value: Any, idx: list[int]) -> Any:
    return [value[i] for i in idx] if isinstance(value, (list, tuple)) else value


def step(opt: Any, group: dict[str, Any], b: Any) -> None:
    """One eager step of bucket ``b``: steps advanced and ``transform_grads`` once, then for
    each chunk: maximize, weight decay and ``opt.update`` (as ``Optimizer.prepare`` would do
    over the whole bucket)."""
    t = advance_steps(b.steps)
    grads = opt.transform_grads(group, b.g)
    decay_lr = opt.decay_lr(group, t)
    names = list(b.s)
    chunk_threads.run(lambda chunk: _step_chunk(opt, group, b, chunk, t, grads, decay_lr, names),
                      list(chunks(b.p, grads, b.s, CHUNK)), chunk_threads.STEP_THREADS)


def _step_chunk(opt: Any, group: dict[str, Any], b: Any, chunk: list[Piece], t: list[float],
                grads: Sequence[Tensor], decay_lr: Any, names: list[str]) -> None:
    idx = [i for i, _, _ in chunk]
    whole = [start == 0 and stop == b.p[i].numel() for i, start, stop in chunk]
    p, g = _cuts(b.p, chunk, whole), _cuts(grads, chunk, whole)
    s = {name: _cuts(b.s[name], chunk, whole) for name in names}
    owned = False
    if group["maximize"]:
        g, owned = g.neg(), True
    g = apply_weight_decay(group["weight_decay_mode"], group["weight_decay"], p, g,
                           _pick(decay_lr, idx), owned)
    opt.update(group, p, g, s, [t[i] for i in idx])
