"""The step of a bucket with low-bit state: decode a chunk, update it, encode it back.

The optimizer's own update runs unchanged on each chunk: a few tensors (or block-aligned
slices of a large one) whose low-bit state entries are decoded into temporaries of at most
:data:`~optforge.lowbit.state.CHUNK` entries per state. An elementwise update gives the same
result on any split of its tensors, so the chunks only bound the memory. Full-precision state
in the same bucket (small tensors, states declared ``"full"``) is updated in place.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import Tensor

from ..tensorlist import TensorList
from .state import CHUNK, LowBitState, noise_seed

__all__ = ["param_positions", "pieces", "step_eager"]

Piece = tuple[int, int, int]       # (tensor index in the bucket, first entry, end entry)


def param_positions(opt: Any) -> dict[int, int]:
    """Each parameter's position in the optimizer (id -> index): with the step count, it
    seeds the stochastic rounding of its state, so a resumed run rounds alike."""
    params = (p for group in opt.param_groups for p in group["params"])
    return {id(p): i for i, p in enumerate(params)}


def _splittable(p: Tensor, states: list[Any]) -> bool:
    return p.is_contiguous() and all(isinstance(x, LowBitState) or x.is_contiguous() for x in states)


def pieces(p: list[Tensor], s: dict[str, list[Any]], size: int = CHUNK) -> Iterator[list[Piece]]:
    """The bucket's entries in chunks of about ``size``: whole tensors grouped, large
    contiguous ones cut at multiples of ``size`` (block-aligned for every code)."""
    chunk: list[Piece] = []
    filled = 0
    for i, x in enumerate(p):
        n = x.numel()
        cuts = (range(0, n, size) if n > size and _splittable(x, [xs[i] for xs in s.values()])
                else range(0, n or 1, max(n, 1)))
        for start in cuts:
            stop = min(start + size, n) if n > size else n
            chunk.append((i, start, stop))
            filled += stop - start
            if filled >= size:
                yield chunk
                chunk, filled = [], 0
    if chunk:
        yield chunk


def _cut(x: Tensor, start: int, stop: int) -> Tensor:
    return x if start == 0 and stop == x.numel() else x.view(-1)[start:stop]


def step_eager(opt: Any, group: dict[str, Any], b: Any, w: Any) -> None:
    """Run ``opt.update`` over the prepared work ``w`` of bucket ``b``, chunk by chunk."""
    index = param_positions(opt)
    names = list(b.s)
    grads: dict[int, Tensor] = {}
    for chunk in pieces(w.p, b.s):
        dtype = w.p[chunk[0][0]].dtype
        p, g, t = TensorList(), TensorList(), []
        s: dict[str, TensorList] = {name: TensorList() for name in names}
        encode: list[tuple[LowBitState, int, Tensor, int]] = []
        copy_back: list[tuple[Tensor, Tensor]] = []
        for i, start, stop in chunk:
            whole = start == 0 and stop == w.p[i].numel()
            p.append(_cut(w.p[i], start, stop))
            if not whole and i not in grads:
                grads[i] = w.g[i].contiguous()
            g.append(w.g[i] if whole else _cut(grads[i], start, stop))
            t.append(w.t[i])
            for name in names:
                x = b.s[name][i]
                if isinstance(x, LowBitState):
                    work = x.read(start, stop, dtype)[:stop - start]
                    work = work.view(x.shape) if whole else work
                    seed = noise_seed(w.t[i], index[id(b.params[i])], name) if x.code.stochastic else 0
                    encode.append((x, start, work, seed))
                else:
                    x = _cut(x, start, stop)
                    work = x if x.dtype == dtype else x.to(dtype)
                    if work is not x:
                        copy_back.append((x, work))
                s[name].append(work)
        opt.update(group, p, g, s, t)
        for x, start, work, seed in encode:
            x.write(start, work, seed)
        for dst, src in copy_back:
            dst.copy_(src)
