"""Shampoo with blocking and grafting, as Meta's Distributed Shampoo runs it on one device."""

from __future__ import annotations

import numbers
from typing import Any

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
from ..distributed import is_dtensor, local
from ..distributed_matrix import map_matrices
from ..registry import register
from .shampoo_blocks import BlockPlan, Blocks, merged_shape

__all__ = ["Blocks", "Shampoo", "merged_shape"]

GRAFTINGS = ("adam", "adagrad", "rmsprop", "sgd", "none")
FACTOR_DTYPES = {"float32": torch.float32, "float64": torch.float64, "param": None}   # None: the param's
GRAFTING_STATE = {"adam", "adagrad", "rmsprop"}    # graftings that keep a second moment


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
    8 + 8n for a merged vector of n (a (5, 48) matrix: 1928). Blocks of one shape across the
    tensors of a (device, dtype) bucket are computed together: one batched matmul per block
    shape and dim for the factors and the preconditioning, one batched eigendecomposition for
    the inverse roots. Eager only: ``fused=True`` is refused.
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
    #: Blocks of one shape across a bucket's tensors are preconditioned as one batch, so a
    #: tensor's update can round differently with other tensors beside it (batched matmuls).
    stacks_across_tensors = True

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
        names = [n for n in self.state_names_for(group) if n in s]
        directions: list[Tensor | None] = [None] * len(p)
        sharded = is_dtensor(p[0])                  # a bucket holds DTensors of one mesh or plain tensors
        plain = [] if sharded else [i for i, x in enumerate(p) if x.numel()]
        if plain:
            states = {n: [s[n][i] for i in plain] for n in names}
            plan = self._plan(group, [p[i] for i in plain], states)
            for i, d in zip(plain, self._directions(group, plan, [g[i] for i in plain], states,
                                                    [int(t[i]) for i in plain])):
                directions[i] = d
        # Whole tensors on the owner of each under FSDP2 (optforge.distributed_matrix), which
        # keeps all of its state; the step itself runs on every rank's shard.
        if sharded:
            results = map_matrices(self, group, p, g, self._owner_direction(group), batch=False)
            directions = [d if d.numel() else None for d in results]
        if sharded or any(d is None for d in directions):
            xs = [local(x) for x, d in zip(p, directions) if d is not None]
            directions = [d for d in directions if d is not None]
        else:
            xs = p
        if not xs:                                  # every local shard empty (foreach needs a tensor)
            return
        if group["weight_decay_mode"] == "decoupled" and group["weight_decay"] != 0:
            torch._foreach_add_(directions, xs, alpha=group["weight_decay"])       # D + wd W
        torch._foreach_add_(xs, directions, alpha=-float(group["lr"]))             # W <- W - lr (D + wd W)

    def _plan(self, group: dict[str, Any], params: list[Tensor],
              states: dict[str, list[Tensor]]) -> BlockPlan:
        """The bucket's blocks grouped by shape, kept while its state tensors are the same."""
        plans = self.__dict__.setdefault("_block_plans", {})
        key = (id(group), params[0].device, params[0].dtype)
        plan = plans.get(key)
        factors, roots = states["factor_matrices"], states["inv_factor_matrices"]
        if plan is None or not plan.holds(factors, roots):
            plan = plans[key] = BlockPlan([tuple(x.shape) for x in params], factors, roots,
                                          group["max_preconditioner_dim"])
        return plan

    def _owner_direction(self, group: dict[str, Any]):
        def direction(grads: Tensor, states: list[dict[str, Any]]) -> Tensor:      # one whole tensor
            st = states[0]
            plan = BlockPlan([tuple(grads.shape[1:])], [st["factor_matrices"]], [st["inv_factor_matrices"]],
                             group["max_preconditioner_dim"])
            names = [n for n in self.state_names_for(group) if n in st]
            return self._directions(group, plan, [grads[0]], {n: [st[n]] for n in names},
                                    [int(st["step"])])[0][None]
        return direction

    def _directions(self, group: dict[str, Any], plan: BlockPlan, grads: list[Tensor],
                    st: dict[str, list[Tensor]], ks: list[int]) -> list[Tensor]:
        """Each whole tensor's direction D (before the decoupled decay and the lr), updating its
        factors, inverse roots, filtered gradient and grafting state; ``ks``: their steps."""
        (b1, b2), bias = group["betas"], group["use_bias_correction"]
        plan.accumulate(grads, b2)
        second_moment = self._accumulate_grafting(group, grads, st)
        every, start = group["precondition_frequency"], group["start_preconditioning_step"]
        start = every if start == -1 else start
        due = [k == start or (k > start and k % every == 0) for k in ks]
        if any(due):
            plan.refresh_roots(due, [1 - b2**k if bias and b2 < 1 else 1.0 for k in ks], group["epsilon"])
        g_bar = grads
        if b1 != 0:
            m = st["filtered_grad"]
            torch._foreach_lerp_(m, grads, 1 - b1)                         # M_t = b1 M + (1 - b1) G
            g_bar = torch._foreach_div(m, [1 - b1**k for k in ks]) if bias else m
        graft = self._grafting_direction(group, g_bar, second_moment, ks)
        early = [graft is not None and k < start for k in ks]
        directions = plan.directions(g_bar, graft, early)
        return [a.clone() if e else d for a, d, e in zip(graft or directions, directions, early)]

    @staticmethod
    def _accumulate_grafting(group: dict[str, Any], grads: list[Tensor],
                             st: dict[str, list[Tensor]]) -> list[Tensor] | None:
        if group["grafting"] not in GRAFTING_STATE:
            return None
        v, beta = st["grafting_second_moment"], group["grafting_beta2"]
        if group["grafting"] == "adagrad":
            torch._foreach_addcmul_(v, grads, grads)                       # V <- V + G^2
            return v
        if beta != 1:
            torch._foreach_mul_(v, beta)
        torch._foreach_addcmul_(v, grads, grads, value=1 - beta)           # V <- b V + (1 - b) G^2
        return v

    @staticmethod
    def _grafting_direction(group: dict[str, Any], g_bar: list[Tensor], v: list[Tensor] | None,
                            ks: list[int]) -> list[Tensor] | None:
        """The grafted method's direction A of each tensor (None: no grafting)."""
        kind = group["grafting"]
        if kind in ("none", "sgd"):
            return None if kind == "none" else g_bar
        beta = group["grafting_beta2"]
        denom = torch._foreach_div(v, [1 - beta**k if kind == "adam" and beta < 1 else 1.0 for k in ks])
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, group["grafting_epsilon"])
        return torch._foreach_div(g_bar, denom)                              # G_bar / (sqrt(V / bc2) + eps_g)


# compare_lr: with Adam grafting its steps have AdamW's size: AdamW's lr (their README's example)
register(Shampoo, "Shampoo: Kronecker-factored preconditioner with blocking and Adam grafting "
         "(Gupta et al., 2018; Meta's Distributed Shampoo)", elementwise=False, compare_lr=1e-3)
