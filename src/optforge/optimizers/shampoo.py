"""Shampoo with blocking and grafting, as Meta's Distributed Shampoo runs it on one device."""

from __future__ import annotations

import itertools
import numbers
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..base import Optimizer, ParamsT
from ..constraints import (
    boolean,
    closed_unit_interval,
    integer_at_least,
    one_of,
    positive,
    tuple_of,
    unit_interval,
)
from ..distributed import local
from ..distributed_matrix import map_matrices
from ..precision import LOW_PRECISION
from ..registry import register

__all__ = ["Shampoo"]

GRAFTINGS = ("adam", "adagrad", "rmsprop", "sgd", "none")
FACTOR_DTYPES = {"float32": torch.float32, "float64": torch.float64, "param": None}   # None: the param's
GRAFTING_STATE = {"adam", "adagrad", "rmsprop"}    # graftings that keep a second moment


def merged_shape(shape: tuple[int, ...], max_dim: int) -> tuple[int, ...]:
    """Their ``merge_small_dims``: dims of size 1 dropped, then neighbouring dims multiplied
    together from the last one while the product stays <= ``max_dim``: with ``max_dim`` 1024
    a (64, 3, 3, 3) kernel becomes (64, 27) (64 * 27 > 1024), a (5, 48) matrix (240,), a
    0-dim tensor (1,)."""
    if 0 in shape:
        return (0,)
    dims = [d for d in reversed(shape) if d != 1] or [1]
    out = [dims[0]]
    for d in dims[1:]:
        if out[-1] * d <= max_dim:
            out[-1] *= d
        else:
            out.append(d)
    return tuple(reversed(out))


class Blocks(NamedTuple):
    """How a parameter is preconditioned: viewed as ``shape`` (merged dims), cut into blocks of
    at most ``max_dim`` along every dim, row-major. Blocks of one shape form a group
    (``groups``: block dims, their slices), whose factors are batched: one (n, d, d) tensor
    per block dim."""

    shape: tuple[int, ...]
    groups: tuple[tuple[tuple[int, ...], tuple[tuple[slice, ...], ...]], ...]

    @classmethod
    def of(cls, param_shape: tuple[int, ...], max_dim: int) -> Blocks:
        shape = merged_shape(tuple(param_shape), max_dim)
        by_dims: dict[tuple[int, ...], list[tuple[slice, ...]]] = {}
        for corner in itertools.product(*[range(0, d, max_dim) for d in shape]):
            block = tuple(slice(s, min(s + max_dim, d)) for s, d in zip(corner, shape))
            by_dims.setdefault(tuple(s.stop - s.start for s in block), []).append(block)
        return cls(shape, tuple((dims, tuple(slices)) for dims, slices in by_dims.items()))

    @property
    def factor_numel(self) -> int:
        return sum(len(slices) * d * d for dims, slices in self.groups for d in dims)

    def matrices(self, flat: Tensor) -> list[list[Tensor]]:
        """Views of a flat state tensor as each group's (n, d, d) factors, one per block dim."""
        out, at = [], 0
        for dims, slices in self.groups:
            out.append([])
            for d in dims:
                out[-1].append(flat[at:at + len(slices) * d * d].view(len(slices), d, d))
                at += len(slices) * d * d
        return out


def gather(x: Tensor, slices: tuple[tuple[slice, ...], ...]) -> Tensor:
    """The blocks of ``x`` at ``slices``, stacked (read only: a view when there is one block, or
    when they are the consecutive equal blocks of a vector)."""
    if len(slices) == 1:
        return x[slices[0]].unsqueeze(0)
    if x.dim() == 1:
        return x[slices[0][0].start:slices[-1][0].stop].reshape(len(slices), -1)
    return torch.stack([x[s] for s in slices])


def scatter(out: Tensor, slices: tuple[tuple[slice, ...], ...], blocks: Tensor) -> None:
    """Write stacked ``blocks`` into ``out`` at ``slices`` (the inverse of :func:`gather`)."""
    if out.dim() == 1:
        out[slices[0][0].start:slices[-1][0].stop] = blocks.reshape(-1)
        return
    for s, block in zip(slices, blocks):
        out[s] = block


def inverse_root(matrix: Tensor, root: float, epsilon: float) -> Tensor:
    r""":math:`(A + \epsilon I)^{-1/r}` of each matrix of a batch, by eigendecomposition, as
    their default ``EigenConfig``: eigh of :math:`A + \epsilon I` (retried in float64 if it
    fails), and where the smallest eigenvalue :math:`\lambda_{min}` is below :math:`\epsilon`
    (A is not positive definite in floating point), every eigenvalue of that matrix shifted by
    :math:`\epsilon - \lambda_{min}`."""
    dtype = matrix.dtype
    if dtype in LOW_PRECISION:                      # eigh has no bf16 / fp16 kernels
        matrix = matrix.float()
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    ridged = matrix.add(eye, alpha=epsilon)
    try:
        lam, q = torch.linalg.eigh(ridged)
    except RuntimeError:
        if ridged.dtype == torch.float64:
            raise
        lam, q = (x.to(ridged.dtype) for x in torch.linalg.eigh(ridged.double()))
    low = lam.amin(-1, keepdim=True)
    lam = torch.where(low < epsilon, lam - low + epsilon, lam)
    return (q * lam.pow(-1.0 / root).unsqueeze(-2) @ q.transpose(-2, -1)).to(dtype)


def _precondition(blocks: Tensor, roots: list[Tensor]) -> Tensor:
    r""":math:`G \times_1 X_1 \cdots \times_k X_k` for a batch of blocks (n, d_1, ..., d_k), in
    the factors' dtype: each step contracts the leading block dim and appends the result as the
    last (the X are symmetric)."""
    y = blocks
    for x in roots:
        n, d = y.shape[:2]
        rest = y.shape[2:]
        y = (y.to(x.dtype).reshape(n, d, -1).transpose(1, 2) @ x).reshape(n, *rest, x.shape[-1])
    return y.to(blocks.dtype)


def start_or_minus_one(name: str, value: Any) -> None:
    """-1 (start at ``precondition_frequency``) or an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not (value == -1 or value >= 1):
        raise ValueError(f"invalid {name}={value!r}: expected -1 (start at precondition_frequency) "
                         "or an integer >= 1")


class Shampoo(Optimizer):
    r"""Shampoo (Gupta, Koren & Singer, 2018, "Shampoo: Preconditioned Stochastic Tensor
    Optimization"; Anil et al., 2020, "Scalable Second Order Optimization for Deep Learning"),
    as Meta's Distributed Shampoo runs it on one device (Shi et al., 2023, "A Distributed
    Data-Parallel PyTorch Implementation of the Distributed Shampoo Optimizer for Training
    Neural Networks At-Scale", arXiv:2309.06497; facebookresearch/optimizers at commit
    f60660661194de26d3ee78bae6d15820ff8e583d): the algorithm that won the AlgoPerf training
    algorithms competition, with its root-inverse preconditioner, blocking and grafting.

    Each parameter is first viewed with its dims of size 1 dropped and neighbouring dims merged
    (from the last) while their product stays <= ``max_preconditioner_dim`` (a (5, 48) matrix
    becomes a 240-vector), then cut into blocks of at most ``max_preconditioner_dim`` along every
    dim. For a block of order :math:`o` with gradient :math:`G_t` (after coupled weight decay)
    and one factor :math:`L_k` per dim :math:`k`, with :math:`G_{(k)}` the block unfolded along
    dim :math:`k`, :math:`(\beta_1, \beta_2)` = ``betas`` and :math:`\epsilon` = ``epsilon``:

    .. math::
        L_k &\leftarrow \beta_2 L_k + (1 - \beta_2)\, G_{(k)} G_{(k)}^\top
            \quad (\beta_2 = 1: L_k \leftarrow L_k + G_{(k)} G_{(k)}^\top) \\
        X_k &\leftarrow \Big(\frac{L_k}{1 - \beta_2^t} + \epsilon I\Big)^{-1/(2o)}
            \quad \text{at } t = t_0 \text{ and when } t > t_0,\ f \mid t \\
        M_t &= \beta_1 M_{t-1} + (1 - \beta_1) G_t, \qquad
        \bar G_t = \frac{M_t}{1 - \beta_1^t}, \qquad
        P_t = \bar G_t \times_1 X_1 \cdots \times_o X_o \\
        D_t &= \begin{cases} A_t & t < t_0 \\
            \frac{\lVert A_t \rVert}{\lVert P_t \rVert + 10^{-16}}\, P_t & t \ge t_0 \end{cases}
            \qquad W_t = W_{t-1} - \mathrm{lr}\,(D_t + \lambda W_{t-1})

    with :math:`f` = ``precondition_frequency``, :math:`t_0` = ``start_preconditioning_step``
    (-1: :math:`f`) and :math:`X_k = I` until :math:`t_0`. The inverse root is their
    eigendecomposition one (see :func:`inverse_root`): :math:`\epsilon` is added before eigh, and
    eigenvalues below it are shifted up. :math:`A_t` is the grafted method's direction for the
    block, whose norm the Shampoo direction takes (``grafting``), from a second moment
    :math:`V` of the raw gradients with :math:`\beta_g` = ``grafting_beta2`` and
    :math:`\epsilon_g` = ``grafting_epsilon``:

    - ``"adam"``: :math:`V \leftarrow \beta_g V + (1 - \beta_g) G^2`,
      :math:`A = \bar G / (\sqrt{V / (1 - \beta_g^t)} + \epsilon_g)`;
    - ``"rmsprop"``: the same :math:`V`, :math:`A = \bar G / (\sqrt{V} + \epsilon_g)`;
    - ``"adagrad"``: :math:`V \leftarrow V + G^2`, :math:`A = \bar G / (\sqrt{V} + \epsilon_g)`;
    - ``"sgd"``: :math:`A = \bar G`;
    - ``"none"``: :math:`D_t = P_t` at every step (plain gradient descent on the filtered
      gradient until :math:`t_0`, as :math:`X_k = I` then).

    ``use_bias_correction=False`` drops :math:`1 - \beta_2^t` and :math:`1 - \beta_1^t` (not the
    Adam grafting's); :math:`\beta_2 = 1` has none. :math:`\beta_1 = 0` keeps no :math:`M`
    (:math:`\bar G = G`). The decay :math:`\lambda W` (``weight_decay_mode="decoupled"``, their
    ``DECOUPLED``, the default) is added to the grafted direction; ``"coupled"`` adds
    :math:`\lambda W` to the gradient first (their ``L2``), ``"absolute"`` is the base class's.
    ``maximize`` negates the gradient first.

    ``factor_matrix_dtype`` (``"float32"``, theirs, ``"float64"``, or ``"param"``: the
    parameter's) is the dtype of the factors, of their inverse roots and of the preconditioning
    products (eigendecompositions of bf16 / fp16 factors run in float32).

    **Warning**: without grafting, a direction is :math:`P_t` itself, whose scale is set by
    the inverse roots of the smallest eigenvalues. With float32 factors and the default
    :math:`\epsilon = 10^{-12}`, those eigenvalues of a rank-deficient factor (fewer gradients
    accumulated than its size: early in training, and always for merged vectors) are rounding
    noise, so the inverse roots, and the steps, are at noise level. Keep grafting on (the
    default, ``"adam"``), or use ``factor_matrix_dtype="float64"`` and a larger ``epsilon``.

    State: ``step``, ``factor_matrices`` (each block's :math:`L_k`, flattened into one tensor),
    ``inv_factor_matrices`` (their :math:`X_k`, the same way), ``filtered_grad`` (:math:`M`;
    only when :math:`\beta_1 \ne 0`) and ``grafting_second_moment`` (:math:`V`; Adam, RMSprop
    and AdaGrad grafting). Bytes per parameter, with float32 factors and parameters: 4 for each
    of ``filtered_grad`` and ``grafting_second_moment``, plus :math:`8 \sum_k d_k^2 / \prod_k d_k`
    for a block of dims :math:`d_k` (factors and inverse roots): 28 for a (64, 32) matrix,
    8 + 8n for a merged vector of n (a (5, 48) matrix: 1928). Eager only (per-block
    eigendecompositions): ``fused=True`` is refused.
    DTensor parameters (FSDP2, tensor parallel): by owner compute
    (:mod:`optforge.distributed_matrix`): each parameter's whole gradient goes to one owner
    rank, which keeps all of its state whole and returns the direction's shards; the decay
    and the step are applied on the shards.

    Differences from their code, none of which changes the algorithm: their config objects
    are flat keyword arguments here (``grafting="adam"``, ``grafting_beta2``,
    ``grafting_epsilon``, ``factor_matrix_dtype``, one dtype for factors and inverse roots),
    and only their default preconditioner (root inverse by eigendecomposition, exponent
    :math:`1/(2o)`, perturbation before the eigendecomposition) is offered; factors are full
    matrices (theirs: packed upper triangles, half the memory); the step counts are per
    parameter (theirs: per param group); the lr and the bias corrections are Python floats
    (theirs: a float32 tensor, and tensors of torch's default dtype); a failing float64
    eigendecomposition raises (theirs: keeps the previous inverse root, up to 3 times in a row).
    """

    constraints = dict(betas=tuple_of(unit_interval, closed_unit_interval), epsilon=positive,
                       max_preconditioner_dim=integer_at_least(1), precondition_frequency=integer_at_least(1),
                       start_preconditioning_step=start_or_minus_one, use_bias_correction=boolean,
                       grafting=one_of(*GRAFTINGS), grafting_beta2=closed_unit_interval,
                       grafting_epsilon=positive, factor_matrix_dtype=one_of(*FACTOR_DTYPES))
    supports_complex = False
    no_fused_reason = "it preconditions each block with inverse roots of its factor matrices"
    whole_matrices = True
    owner_state = ("factor_matrices", "inv_factor_matrices", "filtered_grad", "grafting_second_moment")

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 epsilon: float = 1e-12, weight_decay: float = 0.0, max_preconditioner_dim: int = 1024,
                 precondition_frequency: int = 100, start_preconditioning_step: int = -1,
                 use_bias_correction: bool = True, grafting: str = "adam", grafting_beta2: float = 0.999,
                 grafting_epsilon: float = 1e-8, factor_matrix_dtype: str = "float32", *,
                 weight_decay_mode: str = "decoupled", maximize: bool = False, fused: bool = False) -> None:
        super().__init__(params, dict(
            lr=lr, betas=betas, epsilon=epsilon, weight_decay=weight_decay,
            max_preconditioner_dim=max_preconditioner_dim, precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step, use_bias_correction=use_bias_correction,
            grafting=grafting, grafting_beta2=grafting_beta2, grafting_epsilon=grafting_epsilon,
            factor_matrix_dtype=factor_matrix_dtype, weight_decay_mode=weight_decay_mode,
            maximize=maximize, fused=fused))

    def check_group(self, group: dict[str, Any]) -> None:
        start, every = group["start_preconditioning_step"], group["precondition_frequency"]
        if start != -1 and start < every:
            raise ValueError(f"invalid start_preconditioning_step={start!r}: expected -1 or an integer "
                             f">= precondition_frequency ({every}), as the inverse roots are first "
                             "computed then")

    def state_names_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        names = ("factor_matrices", "inv_factor_matrices")
        if group["betas"][0] != 0:
            names += ("filtered_grad",)
        if group["grafting"] in GRAFTING_STATE:
            names += ("grafting_second_moment",)
        return names

    def init_state(self, group: dict[str, Any], p: Tensor, name: str) -> Tensor:
        if name not in ("factor_matrices", "inv_factor_matrices") or not p.numel():
            return torch.zeros_like(p, memory_format=torch.preserve_format)
        blocks = Blocks.of(p.shape, group["max_preconditioner_dim"])
        flat = torch.zeros(blocks.factor_numel, dtype=FACTOR_DTYPES[group["factor_matrix_dtype"]] or p.dtype,
                           device=p.device)
        if name == "inv_factor_matrices":
            for group in blocks.matrices(flat):
                for x in group:
                    x.diagonal(dim1=1, dim2=2).fill_(1.0)   # X_k = I until the first inverse roots
        return flat

    def state_shape(self, group: dict[str, Any], p: Tensor, name: str) -> tuple[int, ...]:
        if name in ("factor_matrices", "inv_factor_matrices") and p.numel():
            return (Blocks.of(p.shape, group["max_preconditioner_dim"]).factor_numel,)
        return tuple(p.shape)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's, then the factors back in ``factor_matrix_dtype`` (torch casts every state
        tensor to its parameter's dtype)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            dtype = FACTOR_DTYPES[group["factor_matrix_dtype"]]
            for p in group["params"]:
                st = self.state.get(p, {})
                for name in ("factor_matrices", "inv_factor_matrices"):
                    if dtype is not None and p.numel() and name in st:
                        st[name] = st[name].to(dtype)

    def decay_lr(self, group: dict[str, Any], t: list[float]) -> float:
        return 0.0    # "decoupled": added to the direction (update()); the base's is a no-op

    def prepare(self, group, b):
        dtype = FACTOR_DTYPES[group["factor_matrix_dtype"]]
        for x, st in zip(b.params, b.states):     # checked before the bucket's steps advance
            f, blocks = st.get("factor_matrices"), Blocks.of(x.shape, group["max_preconditioner_dim"])
            if x.numel() and f is not None and (f.numel() != blocks.factor_numel
                                                 or dtype not in (None, f.dtype)):
                raise ValueError(f"Shampoo: the factor matrices of a parameter of shape {tuple(x.shape)} "
                                 "do not fit max_preconditioner_dim / factor_matrix_dtype: they cannot "
                                 "change after the first step")
        return super().prepare(group, b)

    def update(self, group, p, g, s, t):
        # Whole tensors: on the owner of each under FSDP2 (optforge.distributed_matrix), which
        # keeps all of its state; the step itself runs on every rank's shard.
        names = [n for n in self.state_names_for(group) if n in s]
        states = [{"step": k, **{n: s[n][i] for n in names}} for i, k in enumerate(t)]
        directions = map_matrices(self, group, p, g, self._directions(group), states=states, batch=False)
        lr, wd = float(group["lr"]), group["weight_decay"]
        for x, d in zip(p, directions):
            if not d.numel():
                continue
            x = local(x)
            if group["weight_decay_mode"] == "decoupled" and wd != 0:
                d.add_(x, alpha=wd)                                  # D + wd W
            x.add_(d, alpha=-lr)                                     # W <- W - lr (D + wd W)

    def _directions(self, group: dict[str, Any]):
        return lambda grads, states: self._direction(group, grads[0], states[0])[None]   # one at a time

    def _direction(self, group: dict[str, Any], grad: Tensor, st: dict[str, Tensor]) -> Tensor:
        """One whole tensor's direction D (before the decoupled decay and the lr), updating its
        factors, inverse roots, filtered gradient and grafting state."""
        (b1, b2), bias, k = group["betas"], group["use_bias_correction"], int(st["step"])
        blocks = Blocks.of(grad.shape, group["max_preconditioner_dim"])
        factors, roots = blocks.matrices(st["factor_matrices"]), blocks.matrices(st["inv_factor_matrices"])
        g = grad.reshape(blocks.shape)
        for (_, slices), fs in zip(blocks.groups, factors):
            _accumulate(gather(g, slices), fs, b2)
        second_moment = self._accumulate_grafting(group, grad, st)
        every, start = group["precondition_frequency"], group["start_preconditioning_step"]
        start = every if start == -1 else start
        if k == start or (k > start and k % every == 0):
            bc2 = 1 - b2**k if bias and b2 < 1 else 1.0
            for fs, xs in zip(factors, roots):
                for f, root in zip(fs, xs):      # X_k = (L_k / bc2 + eps I)^(-1/(2o)), batched
                    root.copy_(inverse_root(f / bc2, 2 * len(fs), group["epsilon"]))
        g_bar = grad
        if b1 != 0:
            m = st["filtered_grad"]
            m.lerp_(grad, 1 - b1)                                   # M_t = b1 M + (1 - b1) G
            g_bar = m / (1 - b1**k) if bias else m
        graft = self._grafting_direction(group, g_bar, second_moment, k)
        if graft is not None and k < start:
            return graft.clone()
        return _shampoo_direction(blocks, roots, g_bar, graft).reshape(grad.shape)

    @staticmethod
    def _accumulate_grafting(group: dict[str, Any], grad: Tensor, st: dict[str, Tensor]) -> Tensor | None:
        if group["grafting"] not in GRAFTING_STATE:
            return None
        v, beta = st["grafting_second_moment"], group["grafting_beta2"]
        if group["grafting"] == "adagrad":
            return v.addcmul_(grad, grad)                          # V <- V + G^2
        if beta != 1:
            v.mul_(beta)
        return v.addcmul_(grad, grad, value=1 - beta)              # V <- b V + (1 - b) G^2

    @staticmethod
    def _grafting_direction(group: dict[str, Any], g_bar: Tensor, v: Tensor | None, k: int) -> Tensor | None:
        """The grafted method's direction A (None: no grafting)."""
        kind = group["grafting"]
        if kind in ("none", "sgd"):
            return None if kind == "none" else g_bar
        beta = group["grafting_beta2"]
        bc2 = 1 - beta**k if kind == "adam" and beta < 1 else 1.0
        return g_bar / (v / bc2).sqrt_().add_(group["grafting_epsilon"])   # G_bar / (sqrt(V / bc2) + eps_g)


def _shampoo_direction(blocks: Blocks, roots: list[list[Tensor]], g_bar: Tensor,
                       graft: Tensor | None) -> Tensor:
    """Each block's :math:`P = \\bar G \\times_1 X_1 \\cdots \\times_o X_o`, with the norm of
    the grafted direction's block where there is one, in one tensor of the blocks' shape."""
    g_bar = g_bar.reshape(blocks.shape)
    graft = None if graft is None else graft.reshape(blocks.shape)
    direction = torch.empty(blocks.shape, dtype=g_bar.dtype, device=g_bar.device)
    for (dims, slices), xs in zip(blocks.groups, roots):
        d = _precondition(gather(g_bar, slices), xs)
        if graft is not None:                                   # D = |A| / (|P| + 1e-16) P
            ratio = gather(graft, slices).flatten(1).norm(dim=1) / (d.flatten(1).norm(dim=1) + 1e-16)
            d.mul_(ratio.view(-1, *[1] * len(dims)))
        scatter(direction, slices, d)
    return direction


def _accumulate(blocks: Tensor, factors: list[Tensor], beta2: float) -> None:
    """:math:`L_k \\leftarrow \\beta_2 L_k + (1 - \\beta_2) G_{(k)} G_{(k)}^\\top` for each block
    dim of a batch of blocks (:math:`\\beta_2 = 1`: a plain sum, as theirs)."""
    n = blocks.shape[0]
    for k, f in enumerate(factors):
        unfolded = blocks.movedim(k + 1, 1).reshape(n, blocks.shape[k + 1], -1)   # G_(k)
        outer = unfolded @ unfolded.transpose(1, 2)
        if beta2 != 1:
            f.mul_(beta2)
        f.add_(outer, alpha=1 - beta2 if beta2 != 1 else 1.0)


# compare_lr: with Adam grafting its steps have AdamW's size: AdamW's lr (their README's example)
register(Shampoo, "Shampoo: Kronecker-factored preconditioner with blocking and Adam grafting "
         "(Gupta et al., 2018; Meta's Distributed Shampoo)", elementwise=False, compare_lr=1e-3)
