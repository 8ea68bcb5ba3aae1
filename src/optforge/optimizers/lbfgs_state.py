"""L-BFGS's state for DTensor parameters (FSDP2, tensor parallel), laid out so that
``torch.distributed.checkpoint`` can save it once and load it at another world size.

The algorithm works on flat vectors: each rank's concatenation of its local shards. With
plain parameters the state keeps them as they are, on the first parameter (torch's layout).
With DTensor parameters a flat vector has no meaning at another world size, so the state
keeps each vector per parameter: a DTensor of the parameter's shape and placements, a view
of its slice of the rank's flat vector (which the algorithm keeps working on). The history
is ``history_size`` such slots, allocated at the first step (the first ``len(ro)`` in use,
oldest first), so that a fresh optimizer's state has the structure of a saved one, as DCP
needs to load into it; the numbers (``ro``, ``H_diag``, ``t``, ``prev_loss``, the counts) are
Python numbers on the first parameter, equal on every rank."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..distributed import is_dtensor, local

VECTORS = ("d", "prev_flat_grad")
HISTORY = ("old_dirs", "old_stps")


def fresh_numbers() -> dict[str, Any]:
    return dict(func_evals=0, n_iter=0, t=0.0, H_diag=1.0, prev_loss=0.0, ro=[])


def _flat_part(x: Tensor) -> Tensor:
    """A tensor's local shard as the flat vectors hold it (complex as real pairs)."""
    x = local(x)
    return (torch.view_as_real(x) if x.is_complex() else x).reshape(-1)


class Row:
    """One flat vector of this rank's local shards, and the state's views of its slices: one
    per parameter, a DTensor placed as the parameter (a plain tensor beside a plain one)."""

    def __init__(self, flat: Tensor, params: list[Tensor]) -> None:
        from torch.distributed.tensor import DTensor

        self.flat, self.views = flat, []
        offset = 0
        for p in params:
            shard = local(p)
            n = shard.numel() * (2 if shard.is_complex() else 1)
            part = flat[offset:offset + n]
            part = (torch.view_as_complex(part.view(*shard.shape, 2)) if shard.is_complex()
                    else part.view(shard.shape))
            self.views.append(DTensor.from_local(part, p.device_mesh, p.placements, run_check=False,
                                                 shape=p.shape, stride=p.stride()) if is_dtensor(p) else part)
            offset += n


class History:
    """The curvature pairs (y, s), oldest first, at most ``size``, and their ro = 1 / y.s.
    ``spare``: preallocated pairs of flat vectors that new pairs are copied into (a pair
    dropped from the history becomes spare); None: new pairs are kept as they are, in lists
    that grow (torch's state)."""

    def __init__(self, size: int, dirs: list | None, stps: list | None, ro: list | None,
                 spare: list[tuple[Tensor, Tensor]] | None = None) -> None:
        self.size, self.dirs, self.stps, self.ro, self.spare = size, dirs, stps, ro, spare

    def clear(self) -> None:
        if self.spare is not None:
            self.spare.extend(zip(self.dirs, self.stps))
        self.dirs, self.stps, self.ro = [], [], []

    def push(self, y: Tensor, s: Tensor, ys: Tensor) -> None:
        if len(self.dirs) == self.size:
            old = self.dirs.pop(0), self.stps.pop(0)
            del self.ro[0]
            if self.spare is not None:
                self.spare.append(old)
        if self.spare is not None:
            y_row, s_row = self.spare.pop()
            y, s = y_row.copy_(y), s_row.copy_(s)
        self.dirs.append(y)
        self.stps.append(s)
        self.ro.append(1.0 / ys)


class ShardedState:
    """The per-parameter layout of one L-BFGS param group's state (see the module's doc). The
    flat vectors and their views are cached on the optimizer; where the state holds other
    tensors (a state dict was loaded), they are copied into new flat vectors once."""

    def __init__(self, opt: Any, group: dict[str, Any]) -> None:
        self.opt, self.params, self.size = opt, group["params"], group["history_size"]
        self.states = [opt.state[p] for p in self.params]
        self.first = self.states[0]

    # ---- checks, before anything changes ------------------------------------------------------
    def check(self) -> None:
        """Refuse a state this layout cannot continue: a flat one (saved with plain
        parameters, or by torch.optim.LBFGS), another history_size, other placements."""
        if not any(self.states):
            return
        lacking = sorted(set(fresh_numbers()) - set(self.first))
        if lacking:
            self._refuse(0, f"the first parameter's state lacks {lacking}")
        if len(self.first["ro"]) > self.size:
            self._refuse(0, f"it holds {len(self.first['ro'])} curvature pairs, history_size is {self.size}")
        for i, (p, st) in enumerate(zip(self.params, self.states)):
            for key in VECTORS:
                self._check_vector(i, p, key, st.get(key))
            for key in HISTORY:
                slots = st.get(key)
                if not isinstance(slots, list) or len(slots) != self.size:
                    held = f"a list of {len(slots)}" if isinstance(slots, list) else type(slots).__name__
                    self._refuse(i, f"its {key!r} is {held}, expected a list of history_size={self.size} "
                                    "vectors shaped as the parameter")
                for x in slots:
                    self._check_vector(i, p, key, x)

    def _check_vector(self, i: int, p: Tensor, key: str, x: Any) -> None:
        if not torch.is_tensor(x):
            self._refuse(i, f"its {key!r} is {type(x).__name__}")
        same = (is_dtensor(x) == is_dtensor(p) and tuple(x.shape) == tuple(p.shape)
                and (not is_dtensor(p) or (x.device_mesh == p.device_mesh and x.placements == p.placements)))
        if not same:
            held = (f"a DTensor of shape {tuple(x.shape)} with placements {x.placements}" if is_dtensor(x)
                    else f"a plain tensor of shape {tuple(x.shape)}")
            self._refuse(i, f"its {key!r} is {held}")

    def _refuse(self, i: int, what: str) -> None:
        p = self.params[i]
        layout = (f"a DTensor of shape {tuple(p.shape)} with placements {p.placements} on {p.device_mesh}"
                  if is_dtensor(p) else f"a plain tensor of shape {tuple(p.shape)}")
        raise ValueError(f"LBFGS cannot continue the state of parameter {i} ({layout}) with DTensor "
                         f"parameters: {what}. With DTensor parameters (FSDP2, tensor parallel) L-BFGS keeps "
                         "each vector per parameter, placed as the parameter, and history_size slots of "
                         "them; a state saved with plain parameters (one process, DDP, or by "
                         "torch.optim.LBFGS) holds flat vectors that cannot be split into shards: resume "
                         "it with plain parameters")

    # ---- the flat vectors ---------------------------------------------------------------------
    def rows(self) -> dict[str, list[Row]]:
        """The flat vectors behind the state, by state name (the history's in the state's slot
        order); a fresh state is created (zeros; what a zero-lr step without a closure does)."""
        cache = self.opt.__dict__.get("_lbfgs_rows")
        if not any(self.states):
            cache = self._fresh()
        elif cache is None or not self._matches(cache):
            cache = {key: [Row(torch.cat([_flat_part(st[key]) for st in self.states]), self.params)]
                     for key in VECTORS}
            cache.update({key: [Row(torch.cat([_flat_part(st[key][i]) for st in self.states]), self.params)
                                for i in range(self.size)] for key in HISTORY})
            self._place(cache)
        self.opt._lbfgs_rows = cache
        return cache

    def _fresh(self) -> dict[str, list[Row]]:
        shard = local(self.params[0])
        dtype = torch.view_as_real(shard).dtype if shard.is_complex() else shard.dtype
        numel = sum(_flat_part(p).numel() for p in self.params)
        cache = {key: [Row(shard.new_zeros(numel, dtype=dtype), self.params)] for key in VECTORS}
        cache.update({key: [Row(flat, self.params) for flat in shard.new_zeros(self.size, numel, dtype=dtype)]
                      for key in HISTORY})
        self._place(cache)
        self.first.update(fresh_numbers())
        return cache

    def _place(self, cache: dict[str, list[Row]]) -> None:
        for j, st in enumerate(self.states):
            st.update({key: cache[key][0].views[j] for key in VECTORS})
            st.update({key: [row.views[j] for row in cache[key]] for key in HISTORY})

    def _matches(self, cache: dict[str, list[Row]]) -> bool:
        """Whether the state holds the cached views (not tensors a loaded state dict put there)."""
        states = list(enumerate(self.states))
        return (all(cache[key][0].views[j] is st[key] for key in VECTORS for j, st in states)
                and all(row.views[j] is x for key in HISTORY for j, st in states
                        for row, x in zip(cache[key], st[key])))

    def vectors(self) -> tuple[Tensor, Tensor, History]:
        """The direction, the previous gradient and the history, as flat vectors: views of the
        state (the previous gradient is updated in place, the rest by ``store``). After ``rows``."""
        rows = self.opt._lbfgs_rows
        used = len(self.first["ro"])
        dirs, stps = ([row.flat for row in rows[key]] for key in HISTORY)
        history = History(self.size, dirs[:used], stps[:used], list(self.first["ro"]),
                          spare=list(zip(dirs[used:], stps[used:]))[::-1])
        return rows["d"][0].flat, rows["prev_flat_grad"][0].flat, history

    def store(self, d: Tensor, history: History, numbers: dict[str, Any]) -> None:
        """The state after a step: the direction copied into its vector, the history's slots
        ordered (those in use first, oldest first), the numbers as Python numbers."""
        rows = self.opt._lbfgs_rows
        if d is not rows["d"][0].flat:
            rows["d"][0].flat.copy_(d)
        for key, vectors in zip(HISTORY, (history.dirs, history.stps)):
            by_flat = {id(row.flat): row for row in rows[key]}
            used = [by_flat.pop(id(v)) for v in vectors]
            rows[key] = used + list(by_flat.values())
            for j, st in enumerate(self.states):
                st[key] = [row.views[j] for row in rows[key]]
        self.first.update({k: float(v) for k, v in numbers.items()}, ro=[float(r) for r in history.ro])
