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

import torch
from torch import Tensor

from ..fused import _fused_entry, compiled_step
from ..steps import advance_steps
from ..tensorlist import TensorList
from .codes import uniform_noise
from .state import CHUNK, LowBitState, noise_seed

__all__ = ["fused_applies", "param_positions", "pieces", "step_eager", "step_fused"]

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


def _low_bit_entry(kernel: Any, consts: dict[str, Any], codes: dict[str, Any], p: Tensor, g: Tensor,
                   full: dict[str, Tensor], low: dict[str, tuple[Tensor, Tensor | None]],
                   offsets: dict[str, Tensor], c: dict[str, Tensor]) -> None:
    """decode -> maximize, weight decay, the optimizer's kernel -> encode, for one flat piece:
    one compiled graph. ``codes`` (constant) names each low-bit state's code; ``offsets``
    carry the noise seed plus the piece's first index, as in the eager path."""
    n = p.shape[0]
    decoded = {name: code.decode(low[name][0], low[name][1], p.dtype) for name, code in codes.items()}
    state = {**full, **{name: x[:n] for name, x in decoded.items()}}
    _fused_entry(kernel, consts, p, g, state, c)
    for name, code in codes.items():
        x = decoded[name].to(torch.float32)
        noise = uniform_noise(offsets[name], 0, x.shape[0], x.device) if code.stochastic else None
        new_codes, new_scales = code.encode(x, noise)
        low[name][0].copy_(new_codes)
        if new_scales is not None:
            low[name][1].copy_(new_scales)


def fused_applies(b: Any) -> bool:
    """Whether the fused low-bit step can run bucket ``b`` (else the eager one does)."""
    return not (b.is_complex or b.low_precision) and all(p.is_contiguous() for p in b.params)


def step_fused(opt: Any, group: dict[str, Any], b: Any) -> None:
    """The fused step of a bucket with low-bit state: weight decay, maximize and the kernel
    are compiled with the decoding and encoding of each piece (the ``pieces`` of the eager
    path, one tensor or a slice of one each), so each entry is read and written once."""
    t = advance_steps(b.steps)
    g_all = opt.transform_grads(group, b.g)
    index = param_positions(opt)
    consts = opt.kernel_constants(group)
    p0 = b.params[0]
    scalar_dtype = torch.float64 if p0.dtype == torch.float64 else torch.float32
    scalars: dict[float, dict[str, Tensor]] = {}
    for k in sorted(set(t)):
        c = opt.scalars(group, k)
        if group["weight_decay"] != 0 and group["weight_decay_mode"] == "decoupled":
            lr = opt.decay_lr(group, [k])
            c["_decay"] = 1 - (lr[0] if isinstance(lr, list) else lr) * group["weight_decay"]
        values = torch.tensor([float(v) for v in c.values()], dtype=scalar_dtype, device=p0.device)
        scalars[k] = dict(zip(c, values.unbind()))
    grads: dict[int, Tensor] = {}
    for chunk in pieces(b.p, b.s):
        for i, start, stop in chunk:
            if i not in grads:
                grads[i] = g_all[i].reshape(-1)
            full, low, codes, offsets = {}, {}, {}, {}
            for name, xs in b.s.items():
                x = xs[i]
                if isinstance(x, LowBitState):
                    c_range, s_range = x._ranges(start, stop)
                    low[name] = (x.codes[c_range], None if s_range is None else x.scales[s_range])
                    codes[name] = x.code
                    seed = noise_seed(t[i], index[id(b.params[i])], name) if x.code.stochastic else 0
                    offsets[name] = torch.tensor(seed + start, dtype=torch.int64, device=p0.device)
                else:
                    full[name] = x.view(-1)[start:stop]
            entry = compiled_step(type(opt), (consts, tuple(codes.items()), p0.dtype, p0.device.type),
                                  _low_bit_entry)
            entry(type(opt).kernel, consts, codes, b.p[i].view(-1)[start:stop], grads[i][start:stop],
                  full, low, offsets, scalars[t[i]])
