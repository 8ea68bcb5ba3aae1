"""The step of a bucket with low-bit state: decode a chunk, update it, encode it back.

The optimizer's own update runs unchanged on each chunk: a few tensors (or block-aligned
slices of a large one) whose low-bit state entries are decoded into temporaries of at most
:data:`~optforge.lowbit.state.CHUNK` entries per state. An elementwise update gives the same
result on any split of its tensors, so the chunks only bound the memory. Full-precision state
in the same bucket (small tensors, states declared ``"full"``) is updated in place.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from .. import chunk_threads
from ..distributed import local, placed_as
from ..eager_chunks import group_pieces
from ..fused import _frozen, _fused_entry, _kernel_scalars, compile_entry
from ..steps import advance_steps
from ..tensorlist import TensorList
from .buffers import ChunkBuffers, decode_into, encode_into, in_place
from .codes import Code
from .state import CHUNK, LowBitState, noise_for, noise_seed

__all__ = ["fused_applies", "param_positions", "pieces", "step_eager", "step_fused"]

Piece = tuple[int, int, int]       # (tensor index in the bucket, first entry, end entry)

#: Entries one compiled call takes when no state of the bucket rounds stochastically: the
#: compiled pass allocates nothing per entry, so larger pieces only save calls (measured:
#: 4M-entry pieces take 1.5x torch's fused AdamW on int8, 256K-entry ones 2.2x). Stochastic
#: rounding keeps the eager pieces, whose positions place its noise.
FUSED_CHUNK = 1 << 22

#: Entries one eager chunk takes when every low-bit state of the bucket is int8 (decoded into
#: reused buffers): each chunk costs about 40 torch calls beside its arithmetic, and on several
#: threads as many parallel regions (very slow where other processes share the cores); a
#: chunk's few float32 buffers (4 MiB each) stay in a 32 MiB L3. The other codes, whose
#: temporaries are allocated per chunk, keep CHUNK (fp8 measured slower in larger chunks).
EAGER_CHUNK = 1 << 20


def param_positions(opt: Any) -> dict[int, int]:
    """Each parameter's position in the optimizer (id -> index): with the step count, it
    seeds the stochastic rounding of its state, so a resumed run rounds alike."""
    params = (p for group in opt.param_groups for p in group["params"])
    return {id(p): i for i, p in enumerate(params)}


def _splittable(p: Tensor, states: list[Any]) -> bool:
    return p.is_contiguous() and all(isinstance(x, LowBitState) or x.is_contiguous() for x in states)


def pieces(p: list[Tensor], s: dict[str, list[Any]], size: int | None = None) -> Iterator[list[Piece]]:
    """The bucket's entries in chunks of about ``size``: whole tensors grouped, large
    contiguous ones cut at multiples of ``size`` (block-aligned for every code)."""
    return group_pieces([x.numel() for x in p],
                        lambda i: _splittable(p[i], [xs[i] for xs in s.values()]), size or CHUNK)


def _cut(x: Tensor, start: int, stop: int) -> Tensor:
    return x if start == 0 and stop == x.numel() else x.view(-1)[start:stop]


def _joined(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class _Decoded:
    """The low-bit pieces of one state in a chunk, decoded into one buffer (one decode and one
    encode per chunk, not per tensor; blocks stay aligned, as each piece is padded to them)."""

    def __init__(self, code: Code, buffers: ChunkBuffers, key: tuple[str, Code]) -> None:
        self.code, self.buffers, self.key = code, buffers, key
        self.items: list[tuple[LowBitState, int, int, int]] = []    # (state, start, stop, seed)

    def decode(self, dtype: torch.dtype) -> list[Tensor]:
        """Each piece's entries (views of one buffer, in the order added)."""
        code, buffers = self.code, self.buffers
        ranges = [x.ranges(start, stop) for x, start, stop, _ in self.items]
        parts = [x.codes[c] for (x, *_), (c, _) in zip(self.items, ranges)]
        scales = (None if code.scale_dtype is None else
                  _joined([x.scales[s] for (x, *_), (_, s) in zip(self.items, ranges)]))
        self.in_place = in_place(code, dtype)
        if self.in_place:
            n, codes = sum(map(len, parts)), parts[0]
            if len(parts) > 1:
                codes = torch.cat(parts, out=buffers.take("codes", n, torch.int8))
            self.buffer = buffers.take(self.key, n, dtype)
            decode_into(code, codes, scales, self.buffer)
        else:   # (its result may be the codes themselves: bf16 state of bf16 parameters)
            self.buffer = code.decode(_joined(parts), scales, dtype).view(-1)
        views, at = [], 0
        for _, start, stop, _ in self.items:
            n, padded = stop - start, code.padded(stop - start)
            views.append(self.buffer[at:at + n])
            if padded > n:   # zeros, as a fresh encoding pads (not the least level an unsigned code reads)
                self.buffer[at + n:at + padded].zero_()
            at += padded
        return views

    def encode(self) -> None:
        code = self.code
        if self.in_place:
            codes, scales = encode_into(code, self.buffer, self.buffers.take("scratch", self.buffer.numel(),
                                                                              torch.float32))
        else:
            buffer = self.buffer.to(torch.float32)
            noise = None
            if code.stochastic:
                noise = _joined([noise_for(seed, x.origin + start, code.padded(stop - start), buffer.device)
                                 for x, start, stop, seed in self.items])
            codes, scales = code.encode(buffer, noise)
            codes = codes.view(-1)
        at_code = at_scale = 0
        for x, start, stop, _ in self.items:
            c, s = x.ranges(start, stop)
            x.codes[c].copy_(codes[at_code:at_code + c.stop - c.start])
            at_code += c.stop - c.start
            if s is not None:
                x.scales[s].copy_(scales[at_scale:at_scale + s.stop - s.start])
                at_scale += s.stop - s.start


def step_eager(opt: Any, group: dict[str, Any], b: Any, w: Any) -> None:
    """Run ``opt.update`` over the prepared work ``w`` of bucket ``b``, chunk by chunk (on
    :mod:`optforge.chunk_threads` where ``STEP_THREADS`` is set, each thread with buffers of its
    own)."""
    index = param_positions(opt)
    low = [x for xs in b.s.values() for x in xs if isinstance(x, LowBitState)]
    size = EAGER_CHUNK if all(in_place(x.code, w.p[0].dtype) for x in low) else CHUNK
    grads = [g if p.numel() <= size else g.contiguous() for p, g in zip(w.p, w.g)]   # sliceable
    device = w.p[0].device
    main, per_thread = ChunkBuffers(device, size), threading.local()

    def run(chunk: list[Piece]) -> None:
        buffers = main if threading.current_thread() is caller else getattr(per_thread, "buffers", None)
        if buffers is None:
            buffers = per_thread.buffers = ChunkBuffers(device, size)
        _step_chunk(opt, group, b, w, chunk, grads, buffers, index)

    caller = threading.current_thread()
    chunk_threads.run(run, list(pieces(w.p, b.s, size)), chunk_threads.STEP_THREADS)


def _step_chunk(opt: Any, group: dict[str, Any], b: Any, w: Any, chunk: list[Piece],
                grads: list[Tensor], buffers: ChunkBuffers, index: dict[int, int]) -> None:
    names = list(b.s)
    dtype = w.p[chunk[0][0]].dtype
    p, g, t = TensorList(), TensorList(), []
    s: dict[str, TensorList] = {name: TensorList() for name in names}
    decoded: dict[tuple[str, Code], _Decoded] = {}
    slots: dict[tuple[str, Code], list[tuple[int, torch.Size | None]]] = {}
    copy_back: list[tuple[Tensor, Tensor]] = []
    for i, start, stop in chunk:
        whole = start == 0 and stop == w.p[i].numel()
        p.append(_cut(w.p[i], start, stop))
        g.append(w.g[i] if whole else _cut(grads[i], start, stop))
        t.append(w.t[i])
        for name in names:
            x = b.s[name][i]
            if isinstance(x, LowBitState):
                key = (name, x.code)
                seed = noise_seed(w.t[i], index[id(b.params[i])], name) if x.code.stochastic else 0
                batch = decoded.setdefault(key, _Decoded(x.code, buffers, key))
                batch.items.append((x, start, stop, seed))
                slots.setdefault(key, []).append((len(s[name]), x.shape if whole else None))
                s[name].append(None)                          # filled in below
            else:
                x = _cut(x, start, stop)
                work = x if x.dtype == dtype else x.to(dtype)
                if work is not x:
                    copy_back.append((x, work))
                s[name].append(work)
    for key, batch in decoded.items():
        for (at, shape), view in zip(slots[key], batch.decode(dtype)):
            s[key[0]][at] = view if shape is None else view.view(shape)
    opt.update(group, p, g, s, t)
    for batch in decoded.values():
        batch.encode()
    for dst, src in copy_back:
        dst.copy_(src)


def _low_bit_entry(kernel: Any, consts: dict[str, Any], p: Tensor, g: Tensor, full: dict[str, Tensor],
                   low: dict[str, tuple[Tensor, Tensor | None]], noise: dict[str, Tensor],
                   c: dict[str, Tensor]) -> None:
    """decode -> maximize, weight decay, the optimizer's kernel -> encode, for one piece of
    whole blocks: one compiled graph. ``CODES``, each low-bit state's code, is a global of each
    compiled copy (so their block sizes are constants, not symbols of a dynamic shape); every
    tensor comes one row per block (so no index goes through a flat view and back);
    ``noise`` holds the stochastic rounding noise of those that need it (the eager path's)."""
    codes = CODES  # noqa: F821 (a global of each compiled copy)
    state = dict(full)
    state.update({name: code.decode(low[name][0], low[name][1], p.dtype) for name, code in codes.items()})
    _fused_entry(kernel, consts, p, g, state, c)
    for name, code in codes.items():
        new_codes, new_scales = code.encode(state[name].to(torch.float32), noise.get(name))
        low[name][0].copy_(new_codes)
        if new_scales is not None:
            low[name][1].copy_(new_scales)


_COMPILED: dict[tuple, Any] = {}


def _compiled(cls: type, consts: dict[str, Any], codes: dict[str, Code], dtype: torch.dtype,
              device_type: str) -> Any:
    """The compiled low-bit entry for an optimizer class, its kernel constants and codes: a
    copy of the entry's code object each (as ``fused.compiled_step`` makes, so that dynamo's
    per-code recompile limit is per configuration), with ``CODES`` among its globals."""
    key = (cls, _frozen(consts), tuple(codes.items()), dtype, device_type)
    fn = _COMPILED.get(key)
    if fn is None:
        code = _low_bit_entry.__code__.replace(co_name=f"_low_bit_{cls.__name__}")
        copy = types.FunctionType(code, {**_low_bit_entry.__globals__, "CODES": dict(codes)}, code.co_name)
        fn = _COMPILED[key] = compile_entry(copy)
    return fn


def fused_applies(b: Any) -> bool:
    """Whether the fused low-bit step can run bucket ``b`` (else the eager one does)."""
    return not (b.is_complex or b.low_precision) and all(local(p).is_contiguous() for p in b.params) and all(
        isinstance(x, LowBitState) or local(x).is_contiguous() for xs in b.s.values() for x in xs)


def step_fused(opt: Any, group: dict[str, Any], b: Any) -> None:
    """The fused step of a bucket with low-bit state: weight decay, maximize and the kernel
    are compiled with the decoding and encoding of each piece (the ``pieces`` of the eager
    path, one tensor or a slice of one each; slices of up to :data:`FUSED_CHUNK` entries where
    no state rounds stochastically), so each entry is read and written once. The
    compiled pass takes whole blocks (its index arithmetic then stays simple); the entries of a
    tensor's last, partial block run the same function uncompiled. DTensor parameters
    (FSDP2) run on their local shards."""
    t = advance_steps(b.steps)
    g_all = [local(placed_as(g, p)) for g, p in zip(opt.transform_grads(group, b.g), b.p)]
    p_all = [local(p) for p in b.p]
    s_all = {name: [local(x) for x in xs] for name, xs in b.s.items()}
    index = param_positions(opt)
    consts = opt.kernel_constants(group)
    scalars = {k: _kernel_scalars(opt, group, k, b.params[0]) for k in sorted(set(t))}
    stochastic = any(x.code.stochastic for xs in b.s.values() for x in xs if isinstance(x, LowBitState))
    for chunk in pieces(p_all, s_all, CHUNK if stochastic else FUSED_CHUNK):
        for i, start, stop in chunk:
            states = {name: xs[i] for name, xs in s_all.items()}
            block = max((x.code.block for x in states.values() if isinstance(x, LowBitState)), default=1)
            whole_blocks = start + (stop - start) // block * block
            g = g_all[i].reshape(-1)
            for a, z, compiled in ((start, whole_blocks, True), (whole_blocks, stop, False)):
                if z > a:
                    _run_piece(opt, consts, p_all[i].view(-1)[a:z], g[a:z], states, a, z, scalars[t[i]],
                               (t[i], index[id(b.params[i])]), compiled)


def _run_piece(opt: Any, consts: dict[str, Any], p: Tensor, g: Tensor, states: dict[str, Any], start: int,
               stop: int, c: dict[str, Tensor], seed_of: tuple[float, int], compiled: bool) -> None:
    """Entries [start, stop) of one tensor (stochastic rounding takes the noise of their
    place in the whole tensor, as the eager path does, so both paths round alike)."""
    full, low, codes, noise = {}, {}, {}, {}
    block = max((x.code.block for x in states.values() if isinstance(x, LowBitState)), default=1)
    rows = (-1, block) if compiled else (-1,)
    for name, x in states.items():
        if isinstance(x, LowBitState):
            c_range, s_range = x.ranges(start, stop)
            codes_of = x.codes[c_range]
            low[name] = (codes_of.view(-1, x.code.code_offset(block)) if compiled else codes_of,
                         None if s_range is None else x.scales[s_range])
            codes[name] = x.code
            if x.code.stochastic:
                seed, n = noise_seed(seed_of[0], seed_of[1], name), x.code.padded(stop - start)
                noise[name] = noise_for(seed, x.origin + start, n, p.device).view(rows)
        else:
            full[name] = x.view(-1)[start:stop].view(rows)
    p, g = p.view(rows), g.view(rows)
    if compiled:
        entry = _compiled(type(opt), consts, codes, p.dtype, p.device.type)
        entry(type(opt).kernel, consts, p, g, full, low, noise, c)
        return
    # the last, partial block: decode with its padding, update the entries, encode
    state = dict(full)
    decoded = {}
    for name, x in states.items():
        if isinstance(x, LowBitState):
            decoded[name] = x.read(start, stop, p.dtype)
            state[name] = decoded[name][:stop - start]
    _fused_entry(type(opt).kernel, consts, p, g, state, c)
    for name, buffer in decoded.items():
        states[name].write(start, buffer, noise_seed(seed_of[0], seed_of[1], name))
