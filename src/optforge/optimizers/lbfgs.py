"""L-BFGS (torch.optim semantics), with an optional strong-Wolfe line search."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..base import BASE_OPTIONS, Optimizer, ParamsT
from ..constraints import integer_at_least, non_negative, one_of
from ..distributed import full_max, full_sums, is_dtensor, local
from ..registry import register
from ..torch_compat import numbers_for_step
from .lbfgs_state import History, ShardedState, Vector

# (step length, loss, flat gradient, directional derivative) at one point of a line search
Point = tuple[Any, float, Tensor, Any]

CURVATURE_MIN = 1e-10   # a pair (y, s) enters the history only when y.s exceeds this


def cubic_minimizer(t1, f1, g1, t2, f2, g2, bounds=None):
    """The minimizer of the cubic through two points (value and slope at each), clamped to
    ``bounds`` (default: between the points); their midpoint when the cubic has no minimum."""
    low, high = bounds if bounds is not None else (min(t1, t2), max(t1, t2))
    d1 = g1 + g2 - 3 * (f1 - f2) / (t1 - t2)
    disc = d1**2 - g1 * g2
    if not disc >= 0:          # no real minimum (NaN included)
        return (low + high) / 2.0
    d2 = torch.as_tensor(disc).sqrt()
    if t1 > t2:                      # the formula measures from the point farther along
        t1, g1, t2, g2 = t2, g2, t1, g1
    t = t2 - (t2 - t1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
    return min(max(t, low), high)


class FlatReductions:
    """Dot products and norms of L-BFGS's vectors over ``params``. Plain tensors: flat vectors,
    the plain ops. DTensors (FSDP2, tensor parallel): ``Vector``s of local shards, each part
    reduced locally, then over the mesh dims that shard its parameter (one all-reduce per
    layout), so every rank gets the numbers of the whole vector and takes the same direction
    and step."""

    def __init__(self, params: list[Tensor]) -> None:
        self.params = params
        self.sharded = any(is_dtensor(p) for p in params)

    def _sums(self, parts: list[Tensor]) -> Tensor:
        return torch.stack(full_sums([part.sum() for part in parts], self.params)).sum()

    def dot(self, a: Any, b: Any) -> Tensor:
        return self._sums(torch._foreach_mul(a.parts, b.parts)) if self.sharded else a.dot(b)

    def abs_sum(self, x: Any) -> Tensor:
        return self._sums(torch._foreach_abs(x.parts)) if self.sharded else x.abs().sum()

    def abs_max(self, x: Any) -> Tensor:
        if not self.sharded:
            return x.abs().max()
        parts = [part.abs().max() if part.numel() else part.new_zeros(()) for part in x.parts]
        return full_max(parts, self.params)


PLAIN = FlatReductions([])


def strong_wolfe(evaluate: Callable[[Any], tuple[float, Tensor]], d: Tensor, start: Point, t,
                 max_evals: int, tolerance_change: float, c1: float = 1e-4, c2: float = 0.9,
                 flat: FlatReductions = PLAIN) -> tuple[float, Tensor, Any, int]:
    """A step ``t`` along ``d`` satisfying the strong Wolfe conditions (Nocedal & Wright,
    Algorithms 3.5 and 3.6, cubic interpolation as in minFunc): extrapolate until an interval
    brackets one, then shrink it. ``evaluate(t)`` is (loss, flat gradient) at ``x + t d``;
    ``flat`` computes the dot products and norms of flat vectors. Returns (loss, gradient, t,
    evaluations)."""
    _, f0, _, slope0 = start
    span = flat.abs_max(d)

    def sufficient_decrease(t, f):
        return f <= f0 + c1 * t * slope0

    def flat_enough(slope):
        return abs(slope) <= -c2 * slope0

    def probe(t) -> Point:
        f, g = evaluate(t)
        return (t, f, g, flat.dot(g, d))

    prev, new = start, probe(t)
    evals = 1
    done = False
    bracket: list[Point] | None = None
    while evals - 1 < max_evals:
        if not sufficient_decrease(new[0], new[1]) or (evals > 2 and new[1] >= prev[1]):
            bracket = [prev, new]
            break
        if flat_enough(new[3]):
            bracket, done = [new], True
            break
        if new[3] >= 0:
            bracket = [prev, new]
            break
        t = cubic_minimizer(prev[0], prev[1], prev[3], new[0], new[1], new[3],
                            bounds=(new[0] + 0.01 * (new[0] - prev[0]), new[0] * 10))
        prev, new = new, probe(t)
        evals += 1
    if bracket is None:              # the evaluations ran out while extrapolating
        bracket = [(0, f0, start[2], None), new]

    def order(b):
        return (0, 1) if b[0][1] <= b[-1][1] else (1, 0)

    lo, hi = order(bracket)
    insufficient_progress = False
    while not done and evals - 1 < max_evals:
        if abs(bracket[1][0] - bracket[0][0]) * span < tolerance_change:
            break
        (a, fa, _, ga), (b, fb, _, gb) = bracket
        t = cubic_minimizer(a, fa, ga, b, fb, gb)
        left, right = min(a, b), max(a, b)
        margin = 0.1 * (right - left)
        # keep the trial point off the interval's ends, or the interval would barely shrink
        if min(right - t, t - left) < margin:
            if insufficient_progress or t >= right or t <= left:
                t = right - margin if abs(t - right) < abs(t - left) else left + margin
                insufficient_progress = False
            else:
                insufficient_progress = True
        else:
            insufficient_progress = False
        new = probe(t)
        evals += 1
        if not sufficient_decrease(new[0], new[1]) or new[1] >= bracket[lo][1]:
            bracket[hi] = new
            lo, hi = order(bracket)
        else:
            if flat_enough(new[3]):
                done = True
            elif new[3] * (bracket[hi][0] - bracket[lo][0]) >= 0:
                bracket[hi] = bracket[lo]
            bracket[lo] = new
    t, f, g, _ = bracket[lo]
    return f, g, t, evals


class LBFGS(Optimizer):
    r"""Limited-memory BFGS (Liu & Nocedal, 1989), as ``torch.optim.LBFGS`` computes it.

    Each ``step(closure)`` runs up to ``max_iter`` iterations on the flattened parameters
    :math:`x` with gradient :math:`g`. The direction is :math:`d = -H g`, with :math:`H` the
    two-loop recursion over the last ``history_size`` pairs :math:`s = x_{k+1} - x_k`,
    :math:`y = g_{k+1} - g_k` (a pair is kept when :math:`y^\top s > 10^{-10}`) and the initial
    scaling :math:`\gamma = y^\top s / y^\top y` of the newest pair. The step is
    :math:`x \leftarrow x + t d` with :math:`t = \mathrm{lr}` (the very first iteration:
    :math:`t = \min(1, 1/\lVert g\rVert_1)\,\mathrm{lr}`), or, with
    ``line_search_fn="strong_wolfe"``, a step from that start satisfying the strong Wolfe
    conditions (:math:`c_1 = 10^{-4}, c_2 = 0.9`). The iterations stop at ``max_iter``, after
    ``max_eval`` closure calls, when :math:`\max|g| \le` ``tolerance_grad``, or when the step
    or the loss change falls below ``tolerance_change``.

    ``step`` needs a closure that clears the gradients, computes the loss, calls
    ``backward()`` and returns the loss; it returns the loss of its first call. One param group
    only, all parameters on one device (as torch). Complex parameters are optimized as real
    pairs; sparse gradients are used dense.

    DTensor parameters (FSDP2, tensor parallel): the flat vectors are the concatenation of
    the local shards, and every dot product and norm is reduced over the mesh, so every rank
    takes the same direction and step. The closure must return the same loss on every rank,
    the loss over the whole batch (e.g. each rank's loss all-reduced and averaged): the line
    search and the stopping tests compare losses.

    State (torch's names): ``func_evals``, ``n_iter``, ``d``, ``t``, ``old_dirs``, ``old_stps``,
    ``ro``, ``H_diag``, ``prev_flat_grad``, ``prev_loss``, and torch's scratch ``al``. With plain
    parameters all of it is on the first parameter, the vectors flat (torch's layout: a state
    dict moves between this class and ``torch.optim.LBFGS``). With DTensor parameters each
    vector is kept per parameter, a DTensor of its shape and placements, and the history is
    ``history_size`` slots allocated at the first step (``len(ro)`` of them in use), so
    ``torch.distributed.checkpoint`` saves each once and loads it at another world size (see
    :mod:`optforge.optimizers.lbfgs_state`); ``step()`` without a closure at lr 0 (the
    state-creating step of its ``get_state_dict``) creates that state. Memory: about
    ``2 * history_size + 3`` copies of the parameters (the pairs s, y; the direction; two
    gradients), one more with the line search.
    """

    constraints = dict(max_iter=integer_at_least(1), max_eval=integer_at_least(1),
                       tolerance_grad=non_negative, tolerance_change=non_negative,
                       history_size=integer_at_least(1), line_search_fn=one_of(None, "strong_wolfe"))
    supports_sparse = True
    shard_reductions = True     # the dot products and norms of DTensor shards are reduced over the mesh

    def __init__(self, params: ParamsT, lr: float | Tensor = 1, max_iter: int = 20,
                 max_eval: int | None = None, tolerance_grad: float = 1e-7,
                 tolerance_change: float = 1e-9, history_size: int = 100,
                 line_search_fn: str | None = None) -> None:
        if max_eval is None:                  # torch's default: 1.25 evaluations per iteration
            integer_at_least(1)("max_iter", max_iter)
            max_eval = max_iter * 5 // 4
        super().__init__(params, dict(lr=lr, max_iter=max_iter, max_eval=max_eval,
                                      tolerance_grad=tolerance_grad, tolerance_change=tolerance_change,
                                      history_size=history_size, line_search_fn=line_search_fn))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self.param_groups:
            raise ValueError("LBFGS doesn't support per-parameter options (parameter groups): "
                             "it optimizes all parameters as one vector, in one param group")
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # The base gives a loaded state without a step count one; L-BFGS keeps no such count.
        counted = {id(st) for st in state.get("state", {}).values() if "step" in st}
        super().__setstate__(state)
        for st in self.state.values():
            if id(st) not in counted:
                st.pop("step", None)

    # ---- flat views of the parameters ---------------------------------------------------------
    def _params(self) -> list[Tensor]:
        params = map(local, self.param_groups[0]["params"])
        return [torch.view_as_real(p) if p.is_complex() else p for p in params]

    def _flat_grad(self) -> Any:
        """The gradient: flat (plain parameters), or a ``Vector`` of copies of the local shards."""
        views = []
        for p in self.param_groups[0]["params"]:
            g = p.grad
            if g is None:
                g = torch.zeros_like(local(p))
            elif is_dtensor(g):
                g = g.to_local()
            elif g.is_sparse:
                g = g.to_dense()
            views.append(torch.view_as_real(g) if g.is_complex() else g)
        if any(is_dtensor(p) for p in self.param_groups[0]["params"]):
            return Vector([g.clone(memory_format=torch.contiguous_format) for g in views])
        return torch.cat([g.reshape(-1) for g in views])

    def _move(self, t, d: Any) -> None:
        """x <- x + t d, over the parameters' flat concatenation (or a ``Vector``'s parts)."""
        if isinstance(d, Vector):
            for p, part in zip(self._params(), d.parts):
                p.add_(part, alpha=t)
            return
        offset = 0
        for p in self._params():
            p.add_(d[offset:offset + p.numel()].view_as(p), alpha=t)
            offset += p.numel()

    # ---- the step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Up to ``max_iter`` L-BFGS iterations; returns the loss the closure first returned.
        Without a closure, at lr 0 and with DTensor parameters (what the ``get_state_dict`` of
        ``torch.distributed.checkpoint`` does to a fresh optimizer): creates the state, changes
        no parameter, returns None."""
        group = self.param_groups[0]
        sharded = any(is_dtensor(p) for p in group["params"])
        if closure is None and not (sharded and float(group["lr"]) == 0):
            raise TypeError("LBFGS.step needs a closure (it evaluates the loss several times per "
                            "step): opt.step(closure), with a closure that zeroes the gradients, "
                            "computes the loss, calls backward() and returns the loss. (The state-creating "
                            "step of torch.distributed.checkpoint's get_state_dict, at lr 0 without a "
                            "closure, is supported with DTensor parameters only (FSDP2, tensor parallel); "
                            "with plain parameters, save opt.state_dict() with torch.save)")
        unsupported = sorted(k for k, off in BASE_OPTIONS.items() if group.get(k, off) != off)
        if unsupported:
            raise ValueError(f"LBFGS does not support the options {unsupported} (it steps all "
                             "parameters as one flattened vector)")
        for p in group["params"]:             # refuses Partial placements, low-bit state
            self._check_new_param(group, p)
        layout = ShardedState(self, group) if sharded else None
        if layout is not None:
            layout.check()
            layout.rows()                     # creates a fresh state, takes in a loaded one
        else:
            self._check_flat_state(group)
        if closure is None:
            return None
        with numbers_for_step(group):
            return self._iterate(group, torch.enable_grad()(closure), layout)

    def _check_flat_state(self, group: dict[str, Any]) -> None:
        """Refuse a state saved with DTensor parameters (per-parameter vectors) for plain ones."""
        params = group["params"]
        d = self.state[params[0]].get("d")
        numel = sum(torch.view_as_real(p).numel() if p.is_complex() else p.numel() for p in params)
        if any(self.state[p] for p in params[1:]) or (torch.is_tensor(d) and tuple(d.shape) != (numel,)):
            raise ValueError("LBFGS cannot continue this state with plain parameters: it holds vectors per "
                             "parameter, as L-BFGS keeps them for DTensor parameters (FSDP2, tensor "
                             f"parallel), not flat vectors of all {numel} entries: resume it with DTensor "
                             "parameters (torch.distributed.checkpoint loads it at any world size)")

    def _iterate(self, group: dict[str, Any], closure: Callable[[], Any], layout: ShardedState | None) -> Any:
        lr, max_iter, max_eval = group["lr"], group["max_iter"], group["max_eval"]
        tol_grad, tol_change = group["tolerance_grad"], group["tolerance_change"]
        st = self.state[group["params"][0]]
        st.setdefault("func_evals", 0)
        st.setdefault("n_iter", 0)

        first_loss = closure()
        loss = float(first_loss)
        evals = 1
        st["func_evals"] += 1
        flat = FlatReductions(group["params"])
        g = self._flat_grad()
        if flat.abs_max(g) <= tol_grad:       # already optimal: nothing changes
            return first_loss

        if layout is None:
            d, prev_g = st.get("d"), st.get("prev_flat_grad")
            history = History(group["history_size"], st.get("old_dirs"), st.get("old_stps"), st.get("ro"))
        else:
            d, prev_g, history = layout.vectors()
        t, h_diag, prev_loss = st.get("t"), st.get("H_diag"), st.get("prev_loss")
        for it in range(1, max_iter + 1):
            st["n_iter"] += 1
            if st["n_iter"] == 1:
                history.clear()
                d, h_diag = g.neg(), 1
            else:
                y, s = g.sub(prev_g), d.mul(t)
                ys = flat.dot(y, s)
                if ys > CURVATURE_MIN:
                    history.push(y, s, ys)
                    h_diag = ys / flat.dot(y, y)
                # torch keeps the two-loop's scratch in the state; the per-parameter layout does not
                scratch = st if layout is None else {}
                d = self._direction(scratch, group["history_size"], g, history, h_diag, flat)
            if prev_g is None:
                prev_g = g.clone(memory_format=torch.contiguous_format)
            else:
                prev_g.copy_(g)
            prev_loss = loss
            t = min(1.0, 1.0 / flat.abs_sum(g)) * lr if st["n_iter"] == 1 else lr

            slope = flat.dot(g, d)
            if slope > -tol_change:           # not a descent direction (to within tolerance)
                break
            optimal, used = False, 0
            if group["line_search_fn"] == "strong_wolfe":
                start_x = [p.clone(memory_format=torch.contiguous_format) for p in self._params()]

                def evaluate(step, start_x=start_x, d=d):
                    self._move(step, d)
                    value = float(closure())
                    grad = self._flat_grad()
                    for p, x in zip(self._params(), start_x):
                        p.copy_(x)
                    return value, grad

                loss, g, t, used = strong_wolfe(evaluate, d, (0, loss, g, slope), t,
                                                max_eval - evals, tol_change, flat=flat)
                self._move(t, d)
                optimal = bool(flat.abs_max(g) <= tol_grad)
            else:
                self._move(t, d)
                if it != max_iter:            # the last iteration's loss is the next step's first
                    loss = float(closure())
                    g = self._flat_grad()
                    optimal = bool(flat.abs_max(g) <= tol_grad)
                    used = 1
            evals += used
            st["func_evals"] += used
            if it == max_iter or evals >= max_eval or optimal:
                break
            if flat.abs_max(d.mul(t)) <= tol_change or abs(loss - prev_loss) < tol_change:
                break

        if layout is None:
            st.update(d=d, t=t, old_dirs=history.dirs, old_stps=history.stps, ro=history.ro, H_diag=h_diag,
                      prev_flat_grad=prev_g, prev_loss=prev_loss)
        else:
            layout.store(d, history, dict(t=t, H_diag=h_diag, prev_loss=prev_loss))
        return first_loss

    @staticmethod
    def _direction(st: dict[str, Any], history_size: int, g: Tensor, history: History, h_diag,
                   flat: FlatReductions) -> Tensor:
        """-H g by the two-loop recursion (Nocedal & Wright, Algorithm 7.4)."""
        dirs, stps, ro = history.dirs, history.stps, history.ro
        alpha = st.setdefault("al", [None] * history_size)
        q = g.neg()
        for i in reversed(range(len(dirs))):
            alpha[i] = flat.dot(stps[i], q) * ro[i]
            q.add_(dirs[i], alpha=-alpha[i])
        r = q.mul(h_diag)
        for i in range(len(dirs)):
            beta = flat.dot(dirs[i], r) * ro[i]
            r.add_(stps[i], alpha=alpha[i] - beta)
        return r


register(LBFGS, "L-BFGS with optional strong-Wolfe line search (torch.optim semantics; "
         "step needs a closure, one param group)", elementwise=False)
