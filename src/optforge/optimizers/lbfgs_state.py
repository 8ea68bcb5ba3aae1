"""L-BFGS's vectors and state for DTensor parameters (FSDP2, tensor parallel), laid out so that
``torch.distributed.checkpoint`` can save the state once and load it at another world size.

With plain parameters L-BFGS works on flat vectors, the concatenation of the parameters, and
keeps them so in the state of the first parameter (torch's layout). A flat vector of local
shards has no meaning at another world size, so with DTensor parameters a vector is a
``Vector``, one tensor per parameter's local shard, and the state keeps each part as a
DTensor of the parameter's shape and placements (a view of the part). The history is
``history_size`` such slots, allocated at the first step (the first ``len(ro)`` in use, oldest
first), so that a fresh optimizer's state has the structure of a saved one, as DCP needs to
load into it; the numbers (``ro``, ``H_diag``, ``t``, ``prev_loss``, the counts) are Python
numbers on the first parameter, equal on every rank."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..distributed import is_dtensor, local

VECTORS = ("d", "prev_flat_grad")
HISTORY = ("old_dirs", "old_stps")


def fresh_numbers() -> dict[str, Any]:
    return dict(func_evals=0, n_iter=0, t=0.0, H_diag=1.0, prev_loss=0.0, ro=[])


def real_part(x: Tensor) -> Tensor:
    """A tensor's local shard as L-BFGS works on it (complex as real pairs)."""
    x = local(x)
    return torch.view_as_real(x) if x.is_complex() else x


def _scalar(x: Any) -> Any:
    return x.item() if torch.is_tensor(x) else x


class Vector:
    """A vector of L-BFGS over DTensor parameters: one tensor per parameter, its local shard,
    with the operations L-BFGS applies to its flat vectors (one foreach kernel each)."""

    def __init__(self, parts: list[Tensor]) -> None:
        self.parts = list(parts)

    def neg(self) -> Vector:
        return Vector(torch._foreach_neg(self.parts))

    def sub(self, other: Vector) -> Vector:
        return Vector(torch._foreach_sub(self.parts, other.parts))

    def mul(self, x: Any) -> Vector:
        return Vector(torch._foreach_mul(self.parts, _scalar(x)))

    def add_(self, other: Vector, alpha: Any = 1) -> Vector:
        torch._foreach_add_(self.parts, other.parts, alpha=_scalar(alpha))
        return self

    def copy_(self, other: Vector) -> Vector:
        torch._foreach_copy_(self.parts, other.parts)
        return self

    def clone(self, memory_format: torch.memory_format = torch.contiguous_format) -> Vector:
        return Vector([x.clone(memory_format=memory_format) for x in self.parts])


class Row:
    """A vector of the state and the state's views of its parts: one per parameter, a DTensor
    placed as the parameter (a plain tensor beside a plain one)."""

    def __init__(self, parts: list[Tensor], params: list[Tensor]) -> None:
        from torch.distributed.tensor import DTensor

        self.vector, self.views = Vector(parts), []
        for part, p in zip(parts, params):
            view = torch.view_as_complex(part) if p.is_complex() else part
            self.views.append(DTensor.from_local(view, p.device_mesh, p.placements, run_check=False,
                                                 shape=p.shape, stride=p.stride()) if is_dtensor(p) else view)


class History:
    """The curvature pairs (y, s), oldest first, at most ``size``, and their ro = 1 / y.s.
    ``spare``: preallocated pairs of vectors that new pairs are copied into (a pair dropped
    from the history becomes spare); None: new pairs are kept as they are, in lists that grow
    (torch's state)."""

    def __init__(self, size: int, dirs: list | None, stps: list | None, ro: list | None,
                 spare: list | None = None) -> None:
        self.size, self.dirs, self.stps, self.ro, self.spare = size, dirs, stps, ro, spare

    def clear(self) -> None:
        if self.spare is not None:
            self.spare.extend(zip(self.dirs, self.stps))
        self.dirs, self.stps, self.ro = [], [], []

    def push(self, y: Any, s: Any, ys: Tensor) -> None:
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
    vectors and their views are cached on the optimizer; where the state holds other tensors
    (a state dict was loaded), their local shards become the vectors."""

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
        same = (is_dtensor(x) == is_dtensor(p) and tuple(x.shape) == tuple(p.shape) and x.dtype == p.dtype
                and (not is_dtensor(p) or (x.device_mesh == p.device_mesh and x.placements == p.placements)))
        if not same:
            held = (f"a DTensor of shape {tuple(x.shape)} with placements {x.placements}" if is_dtensor(x)
                    else f"a plain tensor of shape {tuple(x.shape)}")
            self._refuse(i, f"its {key!r} is {held} ({x.dtype})")

    def _refuse(self, i: int, what: str) -> None:
        p = self.params[i]
        layout = (f"a DTensor of shape {tuple(p.shape)} with placements {p.placements} on {p.device_mesh}"
                  if is_dtensor(p) else f"a plain tensor of shape {tuple(p.shape)}")
        raise ValueError(f"LBFGS cannot continue the state of parameter {i} ({layout}, {p.dtype}) with "
                         f"DTensor parameters: {what}. With DTensor parameters (FSDP2, tensor parallel) "
                         "L-BFGS keeps each vector per parameter, placed as the parameter, and history_size "
                         "slots of them; a state saved with plain parameters (one process, DDP, or by "
                         "torch.optim.LBFGS) holds flat vectors that cannot be split into shards: resume "
                         "it with plain parameters")

    # ---- the vectors ---------------------------------------------------------------------------
    def rows(self) -> dict[str, list[Row]]:
        """The vectors behind the state, by state name (the history's in the state's slot
        order); a fresh state is created (zeros: what a zero-lr step without a closure does)."""
        cache = self.opt.__dict__.get("_lbfgs_rows")
        if not any(self.states):
            cache = self._new(lambda key, i: [torch.zeros_like(real_part(p)) for p in self.params])
            self.first.update(fresh_numbers())
        elif cache is None or not self._matches(cache):
            cache = self._new(lambda key, i: [real_part(st[key] if i is None else st[key][i]).contiguous()
                                              for st in self.states])
        self.opt._lbfgs_rows = cache
        return cache

    def _new(self, parts: Any) -> dict[str, list[Row]]:
        """Rows of ``parts(key, slot)`` (slot None for a single vector), placed in the state."""
        cache = {key: [Row(parts(key, None), self.params)] for key in VECTORS}
        cache.update({key: [Row(parts(key, i), self.params) for i in range(self.size)] for key in HISTORY})
        for j, st in enumerate(self.states):
            st.update({key: cache[key][0].views[j] for key in VECTORS})
            st.update({key: [row.views[j] for row in cache[key]] for key in HISTORY})
        return cache

    def _matches(self, cache: dict[str, list[Row]]) -> bool:
        """Whether the state holds the cached views (not tensors a loaded state dict put there)."""
        states = list(enumerate(self.states))
        return (all(cache[key][0].views[j] is st[key] for key in VECTORS for j, st in states)
                and all(row.views[j] is x for key in HISTORY for j, st in states
                        for row, x in zip(cache[key], st[key])))

    def vectors(self) -> tuple[Vector, Vector, History]:
        """The direction, the previous gradient and the history: the state's vectors (the
        previous gradient is updated in place, the rest by ``store``). After ``rows``."""
        rows = self.opt._lbfgs_rows
        used = len(self.first["ro"])
        dirs, stps = ([row.vector for row in rows[key]] for key in HISTORY)
        history = History(self.size, dirs[:used], stps[:used], list(self.first["ro"]),
                          spare=list(zip(dirs[used:], stps[used:]))[::-1])
        return rows["d"][0].vector, rows["prev_flat_grad"][0].vector, history

    def store(self, d: Vector, history: History, numbers: dict[str, Any]) -> None:
        """The state after a step: the direction copied into its vector, the history's slots
        ordered (those in use first, oldest first), the numbers as Python numbers."""
        rows = self.opt._lbfgs_rows
        if d is not rows["d"][0].vector:
            rows["d"][0].vector.copy_(d)
        for key, vectors in zip(HISTORY, (history.dirs, history.stps)):
            by_vector = {id(row.vector): row for row in rows[key]}
            used = [by_vector.pop(id(v)) for v in vectors]
            rows[key] = used + list(by_vector.values())
            for j, st in enumerate(self.states):
                st[key] = [row.views[j] for row in rows[key]]
        self.first.update({k: float(v) for k, v in numbers.items()}, ro=[float(r) for r in history.ro])
