"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner, as the authors' code runs it."""

from __future__ import annotations

import contextlib
import numbers
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import chunk_threads
from ..base import Optimizer, ParamsT
from ..constraints import beta_tuple, boolean, integer_at_least, non_negative, one_of, unit_interval
from ..distributed import local
from ..distributed_matrix import map_matrices
from ..precision import LOW_PRECISION
from ..registry import register

__all__ = ["SOAP"]

DATA_FORMATS = ("channels_first", "channels_last")


def merged_shape(shape: list[int], max_precond_dim: int) -> list[int]:
    """The authors' ``merge_dims``: neighbouring dims multiplied together while the product
    stays <= ``max_precond_dim`` (a (64, 32, 3, 3) kernel -> (64, 288)); dims of size 1 vanish."""
    out, run = [], 1
    for d in shape:
        if run * d > max_precond_dim:
            if run > 1:
                out.append(run)
                run = d
            else:
                out.append(d)
                run = 1
        else:
            run *= d
    if run > 1 or not out:
        out.append(run)
    return out


class Layout(NamedTuple):
    """How a parameter is preconditioned: viewed as ``shape`` (a channels-last 4-D tensor first
    permuted to channels-first, then dims merged), with a Shampoo factor for each dim where
    ``rotated`` is True."""

    shape: tuple[int, ...]
    rotated: tuple[bool, ...]
    channels_last: bool = False

    def view(self, x: Tensor) -> Tensor:
        return (x.permute(0, 3, 1, 2) if self.channels_last else x).reshape(self.shape)

    def restore(self, y: Tensor, like: Tensor) -> Tensor:
        """``y``, in this layout's shape, back in the shape (and dim order) of ``like``."""
        if self.channels_last:
            n, h, w, c = like.shape
            return y.reshape(n, c, h, w).permute(0, 2, 3, 1)
        return y.reshape(like.shape)

    @property
    def factor_numel(self) -> int:
        return sum(d * d for d, on in zip(self.shape, self.rotated) if on)

    def matrices(self, flat: Tensor) -> list[Tensor | None]:
        """Views of a flat state tensor as the (d, d) matrix of each rotated dim (None: not)."""
        out, at = [], 0
        for d, on in zip(self.shape, self.rotated):
            out.append(flat[at:at + d * d].view(d, d) if on else None)
            at += d * d if on else 0
        return out


def _project(x: Tensor, qs: list[Tensor | None], layout: Layout, back: bool = False) -> Tensor:
    """:math:`x \\times_1 Q_1^\\top \\cdots \\times_k Q_k^\\top` (``back``: :math:`Q_i`), in
    ``x``'s shape: each step contracts the leading dim and appends the result as the last.
    ``x`` itself where nothing is rotated, a new tensor otherwise."""
    if all(q is None for q in qs):
        return x
    y = layout.view(x)
    for q in qs:
        y = (y.permute(*range(1, y.dim()), 0) if q is None
             else torch.tensordot(y, q, dims=([0], [1 if back else 0])))
    return layout.restore(y, x)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in LOW_PRECISION else x.dtype


# CPU eigh of a rank-deficient factor (the first step's G G^T, G wider than tall) on several
# threads stalls for seconds when the cores are busy (measured on 2 shared cores: 768 x 768 eigh
# at times 9-17 s on 2 threads, at most 0.14 s on one); up to this size one thread is as fast
# even on idle cores, so such factors run one thread each, as many at once as torch has
# threads. (The refresh's QR stays on all threads: with it on one, a refreshing step took
# 1.16-1.28x as long on near-idle cores.)
SINGLE_THREAD_EIGH_MAX_DIM = 1024


def _runs_on_one_thread(m: Tensor) -> bool:
    return m.device.type == "cpu" and len(m) <= SINGLE_THREAD_EIGH_MAX_DIM


@contextlib.contextmanager
def _torch_threads(n: int):
    threads = torch.get_num_threads()
    if threads == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _eigenbasis(gram: Tensor) -> Tensor:
    """Eigenvectors of a symmetric matrix, by decreasing eigenvalue (eigh; float64 if it fails)."""
    m = gram.to(_compute_dtype(gram))
    eye = torch.eye(len(m), dtype=m.dtype, device=m.device)
    try:
        q = torch.linalg.eigh(m + 1e-30 * eye)[1]
    except RuntimeError:
        q = torch.linalg.eigh(m.double() + 1e-30 * eye.double())[1].to(m.dtype)
    return q.flip(1)


def _set_eigenbases(pairs: list[tuple[Tensor, Tensor]]) -> None:
    """``basis <- _eigenbasis(factor)`` for each (factor, basis) pair: the factors that run on
    one thread (:func:`_runs_on_one_thread`) largest first, shared out among torch's threads
    (:mod:`optforge.chunk_threads`), the others one after the other on all of them."""
    def set_basis(pair: tuple[Tensor, Tensor]) -> None:
        pair[1].copy_(_eigenbasis(pair[0]))

    small = sorted((fb for fb in pairs if _runs_on_one_thread(fb[0])), key=lambda fb: -len(fb[0]))
    for fb in pairs:
        if not _runs_on_one_thread(fb[0]):
            set_basis(fb)
    if min(chunk_threads.workers(), len(small)) > 1:
        chunk_threads.run(set_basis, small)               # each worker on one thread
        return
    with _torch_threads(1):
        for fb in small:
            set_basis(fb)


def _accumulate(grad: Tensor, factors: list[Tensor | None], beta: float) -> None:
    """:math:`L_i \\leftarrow \\beta L_i + (1 - \\beta) G_{(i)} G_{(i)}^\\top` for each factor
    (``grad`` in the layout's shape; :math:`G_{(i)}`: dim i by all the others)."""
    for i, f in enumerate(factors):
        if f is not None:
            others = [j for j in range(grad.dim()) if j != i]
            f.lerp_(torch.tensordot(grad, grad, dims=(others, others)), 1 - beta)


def _power_iteration(factors: list[Tensor | None], bases: list[Tensor | None], v: Tensor,
                     layout: Layout) -> None:
    """One power iteration per factor, :math:`Q \\leftarrow \\mathrm{QR}(L Q)`, with Q's columns
    first ordered by the estimated eigenvalues :math:`\\mathrm{diag}(Q^\\top L Q)`, largest
    first; V's entries follow their columns."""
    v_rot = layout.view(v)
    for i, (f, b) in enumerate(zip(factors, bases)):
        if f is None:
            continue
        dtype = _compute_dtype(f)
        q = b.to(dtype)
        lq = f.to(dtype) @ q
        order = torch.argsort((q * lq).sum(0), descending=True)      # diag(Q^T L Q), reusing L Q
        v_rot = v_rot.index_select(i, order)
        b.copy_(torch.linalg.qr(lq.index_select(1, order))[0])
    v.copy_(layout.restore(v_rot, v))


def beta_or_minus_one(name: str, value: Any) -> None:
    """-1 (``shampoo_beta``: use ``betas[1]``, the authors' default) or a real number in [0, 1)."""
    if not isinstance(value, bool) and isinstance(value, numbers.Real) and value == -1:
        return
    try:
        unit_interval(name, value)
    except ValueError:
        raise ValueError(f"invalid {name}={value!r}: expected -1 (use betas[1]) or a real number "
                         "in [0, 1)") from None


class SOAP(Optimizer):
    r"""SOAP (Vyas et al., 2024, "SOAP: Improving and Stabilizing Shampoo using Adam",
    Algorithm 3), as the authors' code runs it: nikhilvyas/SOAP ``soap.py`` at commit
    a1e553530fde97d0e6b307d7c82ac6d38b072340, with its keyword names and defaults.

    For a matrix gradient :math:`G` (a tensor: one factor per dim, the same way), Shampoo's
    factors :math:`L, R` and their eigenbases :math:`Q_L, Q_R`: the first step only sets the
    preconditioner, :math:`L = (1 - \beta_s) G G^\top`, :math:`R = (1 - \beta_s) G^\top G`,
    :math:`Q_L, Q_R` their eigenvectors by decreasing eigenvalue (``eigh``), and leaves the
    parameter alone, so a gradient never enters its own projection. Then, with :math:`t`
    counting the steps after the first:

    .. math::
        G'_t &= Q_L^\top G_t Q_R, \qquad
        M'_t = \beta_1 M'_{t-1} + (1 - \beta_1) G'_t, \qquad
        V_t = \beta_2 V_{t-1} + (1 - \beta_2)\, G'_t \odot G'_t \\
        N_t &= Q_L \frac{M'_t}{\sqrt{V_t} + \epsilon} Q_R^\top, \qquad
        W_t = W_{t-1} - \mathrm{lr}\, \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}\, N_t, \qquad
        W_t \leftarrow W_t - \mathrm{lr}\, \lambda\, W_t \\
        L &\leftarrow \beta_s L + (1 - \beta_s) G_t G_t^\top, \qquad
        R \leftarrow \beta_s R + (1 - \beta_s) G_t^\top G_t

    :math:`M'` and :math:`V` live in the eigenbasis. When :math:`t` is a multiple of
    ``precondition_frequency`` each :math:`Q` is refreshed by one power iteration: its columns
    are ordered by the estimated eigenvalues :math:`\mathrm{diag}(Q^\top L Q)`, largest first
    (:math:`V`'s entries with them), then :math:`Q \leftarrow \mathrm{QR}(L Q)`, and
    :math:`M'` moves to the new basis, :math:`M' \leftarrow Q_{L,new}^\top Q_{L,old} M'
    Q_{R,old}^\top Q_{R,new}`.

    Options (the authors'): ``shampoo_beta`` is :math:`\beta_s`, -1 meaning :math:`\beta_2`;
    ``correct_bias=False`` drops the factor :math:`\sqrt{1 - \beta_2^t} / (1 - \beta_1^t)`;
    ``normalize_grads`` divides :math:`N_t` by :math:`10^{-30} + \mathrm{RMS}(N_t)`; dims
    larger than ``max_precond_dim`` get no factor (not rotated); ``merge_dims`` first merges
    neighbouring dims while their product is <= ``max_precond_dim`` (dims of size 1 vanish),
    a 4-D tensor being permuted (0, 3, 1, 2) first when ``data_format="channels_last"``
    (``data_format`` matters only then); 1-D params are plain Adam (with the first step
    skipped too) unless ``precondition_1d``. The decay :math:`W \leftarrow W - \mathrm{lr}\,
    \lambda W` applies only when :math:`\lambda > 0`, after the update, as in the authors' code
    (``weight_decay_mode="decoupled"``, the default); ``"coupled"`` / ``"absolute"`` are the
    base class's. ``maximize`` negates the gradient first.

    State: ``step`` (counting the first step too: :math:`t` = ``step`` - 1), ``exp_avg``
    (:math:`M'`, in the eigenbasis), ``exp_avg_sq`` (:math:`V`), ``GG`` (the factors, flattened
    into one tensor) and ``Q`` (their eigenbases, the same way). Eager only (per-tensor
    decompositions); ``fused=True`` is refused. On CPU, the first step's eigendecompositions
    of factors up to 1024 wide run on one thread each (several threads stall on busy cores),
    shared out among torch's threads. Under FSDP2 / tensor parallel (DTensor
    params) each tensor is updated by one owner rank, which keeps its ``exp_avg``,
    ``exp_avg_sq``, ``GG`` and ``Q`` whole (:mod:`optforge.distributed_matrix`,
    docs/distributed.md); the other ranks keep only ``step``.

    Differences from the authors' code, none of which changes the algorithm:

    - eigh and QR run in float32 for bf16/fp16 params, in the param's dtype otherwise (the
      authors': always float32, so float64 params get float64 eigenbases here), and ``GG`` has
      the param's dtype (the authors': torch's default dtype, so their code runs only on params
      of that dtype);
    - :math:`M'` is re-projected only when a basis changes (the authors project it back and
      forth after every step, which changes it by rounding only), and
      :math:`\mathrm{diag}(Q^\top L Q)` reuses the product :math:`L Q` of the power iteration;
    - ``GG`` and ``Q`` are flat tensors (the authors': lists of matrices), a 0-dim param has
      no factor (the authors' ``merge_dims`` gives it a 1 x 1 one, which rotates nothing), and
      ``data_format`` is a hyperparameter of each param group;
    - ``shampoo_beta`` must be -1 or in [0, 1) (the authors take any negative value for -1).
    """

    no_fused_reason = "it rotates each matrix gradient into the eigenbasis of its preconditioners"
    constraints = dict(betas=beta_tuple(2), shampoo_beta=beta_or_minus_one, eps=non_negative,
                       precondition_frequency=integer_at_least(1), max_precond_dim=integer_at_least(1),
                       merge_dims=boolean, precondition_1d=boolean, normalize_grads=boolean,
                       data_format=one_of(*DATA_FORMATS), correct_bias=boolean)
    state_names = ("exp_avg", "exp_avg_sq", "GG", "Q")
    owner_state = state_names
    whole_matrices = True
    supports_complex = False

    def __init__(self, params: ParamsT, lr: float = 3e-3, betas: tuple[float, float] = (0.95, 0.95),
                 shampoo_beta: float = -1.0, eps: float = 1e-8, weight_decay: float = 0.01,
                 precondition_frequency: int = 10, max_precond_dim: int = 10000, merge_dims: bool = False,
                 precondition_1d: bool = False, normalize_grads: bool = False,
                 data_format: str = "channels_first", correct_bias: bool = True, *,
                 weight_decay_mode: str = "decoupled", maximize: bool = False, fused: bool = False) -> None:
        super().__init__(params, dict(
            lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps, weight_decay=weight_decay,
            precondition_frequency=precondition_frequency, max_precond_dim=max_precond_dim,
            merge_dims=merge_dims, precondition_1d=precondition_1d, normalize_grads=normalize_grads,
            data_format=data_format, correct_bias=correct_bias, weight_decay_mode=weight_decay_mode,
            maximize=maximize, fused=fused))

    @staticmethod
    def layout(group: dict[str, Any], p: Tensor) -> Layout:
        """The shape a param is preconditioned in, and which of its dims get a factor."""
        shape, top = tuple(p.shape), group["max_precond_dim"]
        if p.dim() <= 1:
            return Layout(shape, tuple(group["precondition_1d"] and d <= top for d in shape))
        channels_last = group["merge_dims"] and group["data_format"] == "channels_last" and p.dim() == 4
        if channels_last:
            shape = (shape[0], shape[3], shape[1], shape[2])
        if group["merge_dims"]:
            shape = tuple(merged_shape(list(shape), top))
        return Layout(shape, tuple(d <= top for d in shape), channels_last)

    def init_state(self, group: dict[str, Any], p: Tensor, name: str) -> Tensor:
        if name in ("GG", "Q") and p.numel():
            return p.new_zeros(self.layout(group, p).factor_numel)
        return torch.zeros_like(p, memory_format=torch.preserve_format)

    def state_shape(self, group: dict[str, Any], p: Tensor, name: str) -> tuple[int, ...]:
        if name in ("GG", "Q") and p.numel():
            return (self.layout(group, p).factor_numel,)
        return tuple(p.shape)

    def decay_lr(self, group: dict[str, Any], t: list[float]) -> float:
        return 0.0    # "decoupled": applied after the update (update()); the base's is a no-op

    def prepare(self, group, b):
        for x, st in zip(b.params, b.states):     # checked before the bucket's steps advance
            if x.numel() and "GG" in st and st["GG"].numel() != self.layout(group, x).factor_numel:
                raise ValueError(f"SOAP: the preconditioner state of a parameter of shape {tuple(x.shape)} "
                                 "does not fit max_precond_dim / merge_dims / precondition_1d / data_format: "
                                 "they cannot change after the first step")
        return super().prepare(group, b)

    def update(self, group, p, g, s, t):
        # Whole matrices: on the owner of each under FSDP2 (optforge.distributed_matrix), whose
        # state (exp_avg, exp_avg_sq, GG, Q) it keeps; the rest runs on every rank's shard.
        states = [{"step": k, **{n: xs[i] for n, xs in s.items()}} for i, k in enumerate(t)]
        first_bases: list[tuple[Tensor, Tensor]] = []        # (factor, basis) to set on a first step
        directions = map_matrices(self, group, p, g, self._directions(group, first_bases),
                                  states=states, batch=False)
        _set_eigenbases(first_bases)                          # all at once: shared among threads
        (b1, b2), lr = group["betas"], float(group["lr"])
        for x, d, k in zip(p, directions, t):
            n = int(k) - 1
            if n == 0 or x.numel() == 0:              # the first step sets the preconditioner only
                continue
            step = lr * (1 - b2**n) ** 0.5 / (1 - b1**n) if group["correct_bias"] else lr
            local(x).add_(d, alpha=-step)
            if group["weight_decay_mode"] == "decoupled" and group["weight_decay"] > 0:
                x.add_(x, alpha=-lr * group["weight_decay"])                 # W <- W - lr wd W, after

    def _directions(self, group, first_bases):
        return lambda grads, states: self._direction(group, grads[0], states[0], first_bases)[None]

    def _direction(self, group, grad, st, first_bases):
        """One whole matrix's step: Adam's direction N in the eigenbasis (before the step size),
        the factors' update and, every ``precondition_frequency`` steps, the new eigenbasis.
        Zeros on the first step, which only sets the factors; their (factor, basis) pairs go to
        ``first_bases``, for the caller to set the bases."""
        shampoo_beta = group["shampoo_beta"] if group["shampoo_beta"] >= 0 else group["betas"][1]
        m, v, layout = st["exp_avg"], st["exp_avg_sq"], self.layout(group, grad)
        factors, bases = layout.matrices(st["GG"]), layout.matrices(st["Q"])
        if int(st["step"]) == 1:
            _accumulate(layout.view(grad), factors, shampoo_beta)
            first_bases += [(f, b) for f, b in zip(factors, bases) if f is not None]
            return torch.zeros_like(grad)
        direction = self._adam_in_eigenbasis(group, grad, m, v, bases, layout)
        _accumulate(layout.view(grad), factors, shampoo_beta)
        refresh = (int(st["step"]) - 1) % group["precondition_frequency"] == 0
        if refresh and any(f is not None for f in factors):
            m.copy_(_project(m, bases, layout, back=True))          # M' to the parameter's basis,
            _power_iteration(factors, bases, v, layout)
            m.copy_(_project(m, bases, layout))                     # then into the new eigenbasis
        return direction

    @staticmethod
    def _adam_in_eigenbasis(group, grad, m, v, bases, layout):
        b1, b2 = group["betas"]
        g_rot = _project(grad, bases, layout)                            # G' = Q_L^T G Q_R
        m.mul_(b1).add_(g_rot, alpha=1 - b1)                             # M' = b1 M' + (1 - b1) G'
        v.mul_(b2).add_(g_rot.square(), alpha=1 - b2)                    # V = b2 V + (1 - b2) G'^2
        direction = _project(m / v.sqrt().add_(group["eps"]), bases, layout, back=True)   # N
        if group["normalize_grads"]:
            direction.div_(direction.square().mean().sqrt().add_(1e-30))  # N / (1e-30 + RMS(N))
        return direction

register(SOAP, "SOAP: Adam in the eigenbasis of Shampoo's preconditioner (Vyas et al., 2024)",
         elementwise=False)
