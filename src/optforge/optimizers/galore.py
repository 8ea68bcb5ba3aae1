"""GaLore-AdamW: AdamW on a low-rank projection of each matrix gradient, as galore-torch runs it."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..base import Optimizer, ParamsT
from ..constraints import beta_tuple, boolean, integer_at_least, non_negative, one_of, optional
from ..distributed import local
from ..distributed_matrix import map_matrices
from ..registry import register

__all__ = ["GaLoreAdamW"]

PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")


class Projection(NamedTuple):
    """How an (m, n) gradient is projected: onto ``r`` right singular vectors (``P``: (r, n),
    :math:`G P^\\top`), left ones (``P``: (m, r), :math:`P^\\top G`) or both (:math:`A^\\top G B^\\top`)."""

    side: str              # "right", "left" or "full"
    m: int
    n: int
    r: int

    @staticmethod
    def of(group: dict[str, Any], p: Tensor) -> Projection | None:
        """The projection of a param (None: not projected: not a matrix, or rank is None)."""
        if group["rank"] is None or p.dim() != 2 or p.numel() == 0:
            return None
        (m, n), kind = p.shape, group["proj_type"]
        side = {"std": "right" if m >= n else "left",
                "reverse_std": "left" if m >= n else "right"}.get(kind, kind)
        return Projection(side, m, n, min(group["rank"], m, n))

    @property
    def low_rank_shape(self) -> tuple[int, int]:
        return {"right": (self.m, self.r), "left": (self.r, self.n), "full": (self.r, self.r)}[self.side]

    @property
    def numel(self) -> int:
        """Entries of the projection matrices, flattened into one state tensor."""
        left = self.m * self.r if self.side != "right" else 0
        return left + (self.r * self.n if self.side != "left" else 0)

    def matrices(self, flat: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Views of the flat state as (A, B): A the (m, r) left basis, B the (r, n) right one."""
        a = flat[:self.m * self.r].view(self.m, self.r) if self.side != "right" else None
        b = flat[flat.numel() - self.r * self.n:].view(self.r, self.n) if self.side != "left" else None
        return a, b

    def refresh(self, flat: Tensor, grad: Tensor) -> None:
        """New bases from the SVD of the gradient, computed in float32 as galore-torch does."""
        u, s, vh = torch.linalg.svd(grad.float(), full_matrices=False)
        a, b = self.matrices(flat)
        if a is not None:
            a.copy_(u[:, :self.r])
        if b is not None:
            b.copy_(vh[:self.r, :])

    def down(self, flat: Tensor, grad: Tensor) -> Tensor:
        a, b = self.matrices(flat)
        if self.side == "right":
            return grad @ b.t()
        if self.side == "left":
            return a.t() @ grad
        return a.t() @ grad @ b.t()

    def up(self, flat: Tensor, low: Tensor) -> Tensor:
        a, b = self.matrices(flat)
        if self.side == "right":
            return low @ b
        if self.side == "left":
            return a @ low
        return a @ low @ b


class GaLoreAdamW(Optimizer):
    r"""GaLore-AdamW (Zhao et al., 2024, "GaLore: Memory-Efficient LLM Training by Gradient
    Low-Rank Projection", Algorithm 2), as the authors' ``galore-torch`` 1.0 (``GaLoreAdamW``)
    runs it, with its keyword names and defaults.

    In a param group with ``rank`` set, each matrix (2-D) gradient :math:`G \in \mathbb{R}^{m
    \times n}` is projected onto :math:`r` = min(``rank``, m, n) singular vectors. Every
    ``update_proj_gap`` steps, from the first one on (steps 1, gap + 1, 2 gap + 1, ...), the
    bases are recomputed from the current gradient, :math:`U S V^\top = \mathrm{SVD}(G_t)`,
    :math:`P = V_{:r}^\top` (or :math:`U_{:r}`); in between they stay. With ``proj_type="std"``
    (the default) a tall or square :math:`G` is projected on the right, a wide one on the left
    (``"reverse_std"``: the other way round; ``"right"``, ``"left"``: always that side;
    ``"full"``: both, :math:`R_t = U_{:r}^\top G_t V_{:r}`). For the right side:

    .. math::
        R_t &= G_t P^\top, \qquad
        M_t = \beta_1 M_{t-1} + (1 - \beta_1) R_t, \qquad
        V_t = \beta_2 V_{t-1} + (1 - \beta_2) R_t^2 \\
        N_t &= \frac{M_t}{\sqrt{V_t} + \epsilon}, \qquad
        W_t = W_{t-1} - \mathrm{lr}\,\frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}\;
              \alpha\, N_t P, \qquad
        W_t \leftarrow W_t - \mathrm{lr}\,\lambda\, W_t

    with :math:`\alpha` = ``scale``. The moments :math:`M, V` live in the low-rank space
    (:math:`m \times r`), and are *not* rotated when the bases change: as in the authors' code,
    a refresh reinterprets them in the new basis. Other params (vectors, 3-D and 4-D tensors,
    every param of a group with ``rank=None``) take plain AdamW with the same betas and eps
    (:math:`\alpha` = 1, no projection). ``correct_bias=False`` drops the bias correction. The
    decay :math:`W \leftarrow W - \mathrm{lr}\,\lambda W` applies after the update
    (``weight_decay_mode="decoupled"``, the default); ``"coupled"`` / ``"absolute"`` are the
    base class's. ``maximize`` negates the gradient first.

    The SVD runs in float32 whatever the param's dtype (the authors' choice: float64 params get
    float32-accurate bases, stored in float64); everything else runs in the param's dtype.
    State: ``step``, ``exp_avg`` (:math:`M`), ``exp_avg_sq`` (:math:`V`), both of the low-rank
    shape for projected params, and ``projector`` (the bases, flattened into one tensor; empty
    for params that are not projected). Eager only (per-matrix SVDs): ``fused=True`` is refused.
    State bytes per parameter of an (m, n) float32 matrix projected on the right (m >= n):
    :math:`4\,(2r/n + r/m)`, e.g. 0.375 for 4096 x 4096 at rank 128 (AdamW: 8); a matrix whose
    smaller dim is <= ``rank`` is projected at full rank and costs more than AdamW (8 + the basis).

    Differences from the authors' code: ``rank=None`` (a group without projection) replaces
    leaving ``rank`` out of the group; non-matrix params in a group with ``rank`` get AdamW
    (the authors' code fails on them); ``rank``, ``update_proj_gap``, ``scale`` and
    ``proj_type`` have defaults (the paper's: 128, 200, 0.25, ``"std"``) instead of being
    required in the group; and with ``"reverse_std"`` a wide matrix is projected back on the
    side it was projected from when :math:`r = m` (the authors' code picks the other side and
    fails).

    DTensor parameters (FSDP2, tensor parallel): by owner compute
    (:mod:`optforge.distributed_matrix`): each parameter's whole gradient goes to one owner
    rank, which keeps its basis and moments whole and returns the direction's shards.
    """

    constraints = dict(betas=beta_tuple(2), eps=non_negative, correct_bias=boolean,
                       rank=optional(integer_at_least(1)), update_proj_gap=integer_at_least(1),
                       scale=non_negative, proj_type=one_of(*PROJ_TYPES))
    state_names = ("exp_avg", "exp_avg_sq", "projector")
    state_kinds = dict(exp_avg_sq="non_negative", projector="full")
    supports_complex = False
    no_fused_reason = "it projects each matrix gradient onto bases from that matrix's SVD"
    whole_matrices = True
    owner_state = state_names

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True,
                 rank: int | None = 128, update_proj_gap: int = 200, scale: float = 0.25,
                 proj_type: str = "std", *, weight_decay_mode: str = "decoupled", maximize: bool = False,
                 fused: bool = False) -> None:
        super().__init__(params, dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias, rank=rank,
            update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
            weight_decay_mode=weight_decay_mode, maximize=maximize, fused=fused))

    def state_shape(self, group: dict[str, Any], p: Tensor, name: str) -> tuple[int, ...]:
        proj = Projection.of(group, p)
        if name == "projector" and p.numel():
            return (proj.numel if proj else 0,)
        return proj.low_rank_shape if proj else tuple(p.shape)

    def init_state(self, group: dict[str, Any], p: Tensor, name: str) -> Tensor:
        return p.new_zeros(self.state_shape(group, p, name))

    def decay_lr(self, group: dict[str, Any], t: list[float]) -> float:
        return 0.0    # "decoupled": applied after the update (update()); the base's is a no-op

    def prepare(self, group, b):
        for x, st in zip(b.params, b.states):     # checked before the bucket's steps advance
            if "exp_avg" in st and (tuple(st["exp_avg"].shape) != self.state_shape(group, x, "exp_avg")
                                    or st["projector"].shape != self.state_shape(group, x, "projector")):
                raise ValueError(f"GaLoreAdamW: the state of a parameter of shape {tuple(x.shape)} does not "
                                 "fit rank / proj_type: they cannot change after the first step")
        return super().prepare(group, b)

    def update(self, group, p, g, s, t):
        # Whole matrices: on the owner of each under FSDP2 (optforge.distributed_matrix), which
        # keeps its (projected) moments and basis whole; the step itself runs on every rank's shard.
        states = [{"step": k, **{n: xs[i] for n, xs in s.items()}} for i, k in enumerate(t)]
        directions = map_matrices(self, group, p, g, self._directions(group), states=states, batch=False)
        (b1, b2), lr, wd = group["betas"], float(group["lr"]), group["weight_decay"]
        for x, direction, k in zip(p, directions, t):
            if not direction.numel():
                continue
            step = lr
            if group["correct_bias"]:
                step = step * math.sqrt(1.0 - b2**k) / (1.0 - b1**k)
            x = local(x)
            x.add_(direction, alpha=-step)
            if group["weight_decay_mode"] == "decoupled" and wd > 0:
                x.add_(x, alpha=-lr * wd)                         # W <- W - lr wd W, after

    def _directions(self, group: dict[str, Any]):
        return lambda grads, states: self._direction(group, grads[0], states[0])[None]   # one at a time

    def _direction(self, group: dict[str, Any], grad: Tensor, st: dict[str, Tensor]) -> Tensor:
        """One whole tensor's direction (before the step size), updating its moments and, every
        ``update_proj_gap`` steps, its basis."""
        (b1, b2), k = group["betas"], int(st["step"])
        m, v, basis = st["exp_avg"], st["exp_avg_sq"], st["projector"]
        proj = Projection.of(group, grad)
        if proj is not None:
            if (k - 1) % group["update_proj_gap"] == 0:     # steps 1, gap + 1, ...
                proj.refresh(basis, grad)
            grad = proj.down(basis, grad)                     # R = G P^T
        m.mul_(b1).add_(grad, alpha=1.0 - b1)                 # M = b1 M + (1 - b1) R
        v.mul_(b2).addcmul_(grad, grad, value=1.0 - b2)       # V = b2 V + (1 - b2) R^2
        direction = m / v.sqrt().add_(group["eps"])           # N = M / (sqrt(V) + eps)
        if proj is not None:
            direction = proj.up(basis, direction) * group["scale"]   # alpha N P
        return direction


register(GaLoreAdamW, "GaLore-AdamW: AdamW on low-rank projected matrix gradients (Zhao et al., 2024)",
         name="galore_adamw", elementwise=False, compare_lr=1e-3)
