"""PSGD Kron: SGD preconditioned by a learned Kronecker-factored whitening preconditioner."""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..base import Optimizer, ParamsT, Work
from ..constraints import (
    integer_at_least,
    non_negative,
    non_negative_or_inf,
    one_of,
    optional,
    positive,
    probability,
    unit_interval,
)
from ..distributed import local
from ..distributed_matrix import map_matrices
from ..precision import LOW_PRECISION
from ..registry import register

__all__ = ["PSGDKron"]

BALANCE_PROBABILITY = 0.01     # the authors' rate of rebalancing the factors' scales
HOST_DECIDES = {"cpu"}         # devices whose step reads its draws and choices on the host (free there)


def stream_seed(*keys: Any) -> int:
    """A 63-bit seed from ``keys`` (ints, strings): distinct keys give unrelated streams."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def draw_generator(device: torch.device | str, *keys: Any) -> torch.Generator:
    """The generator of the draws named by ``keys``, on ``device``."""
    return torch.Generator(device=device).manual_seed(stream_seed(*keys))


def probe(grad: Tensor, draws: torch.Generator) -> Tensor:
    r""":math:`V \sim \mathcal{N}(0, I)` of the gradient's shape and dtype, drawn in float32 so
    that runs in any dtype draw the same values."""
    v = torch.randn(grad.shape, dtype=torch.float32, device=grad.device, generator=draws)
    return v.to(grad.dtype)


class Factors(NamedTuple):
    """The Kronecker factors of a parameter's preconditioner: per dim, a dense upper-triangular
    (d, d) matrix or a diagonal (d,), flattened one after the other into one state tensor. A
    0-dim parameter is preconditioned as a 1-element vector."""

    shape: tuple[int, ...]
    dense: tuple[bool, ...]

    @staticmethod
    def of(group: dict[str, Any], p: Tensor) -> Factors:
        shape = tuple(p.shape) or (1,)
        second = sorted(shape)[-2] if len(shape) > 1 else 1
        top, skew = group["preconditioner_max_size"], group["preconditioner_max_skew"]
        return Factors(shape, tuple(not (d == 1 or d > top or d > skew * second) for d in shape))

    @property
    def numel(self) -> int:
        return sum(d * d if dense else d for d, dense in zip(self.shape, self.dense))

    def views(self, flat: Tensor) -> list[Tensor]:
        out, at = [], 0
        for d, dense in zip(self.shape, self.dense):
            n = d * d if dense else d
            out.append(flat[at:at + n].view((d, d) if dense else (d,)))
            at += n
        return out


def _along(x: Tensor, i: int, f) -> Tensor:
    """``f`` applied to ``x`` with dim i moved last (a mode-i product when f multiplies)."""
    return f(x.movedim(i, -1)).movedim(-1, i)


def _diagonal(q: Tensor, i: int, order: int) -> Tensor:
    return q.view([-1 if j == i else 1 for j in range(order)])


def _gram(x: Tensor, i: int, dense: bool) -> Tensor:
    """:math:`X_{(i)} X_{(i)}^\\top` of the mode-i unfolding (its diagonal where not dense)."""
    rows = x.movedim(i, 0).reshape(x.shape[i], -1)
    return rows @ rows.T if dense else rows.square().sum(1)


def norm_lower_bound(a: Tensor) -> Tensor:
    """The authors' cheap lower bound of the spectral norm of a symmetric matrix: one power step
    from its largest column (or row), computed on ``a / max|a|`` against under- and overflow.
    Off the host (:data:`HOST_DECIDES`) both candidates are computed and one is selected on the
    device, as is 0 for a zero matrix: a Python ``if`` there would wait for the device."""
    top = a.abs().max()
    on_host = a.device.type in HOST_DECIDES
    if on_host and not top > 0:
        return top
    a = a / (top if on_host else torch.where(top > 0, top, 1.0))
    squares = a * a
    col, i = torch.max(squares.sum(0), 0)
    row, j = torch.max(squares.sum(1), 0)
    if on_host:
        return top * (_from_column(a, a[:, i]) if col > row else _from_row(a, a[j]))
    by_col = _from_column(a, a.index_select(1, i.view(1)).view(-1))
    by_row = _from_row(a, a.index_select(0, j.view(1)).view(-1))
    return torch.where(top > 0, top * torch.where(col > row, by_col, by_row), top)


def _from_column(a: Tensor, column: Tensor) -> Tensor:
    x = column @ a
    return torch.linalg.vector_norm((x / torch.linalg.vector_norm(x)) @ a.T)


def _from_row(a: Tensor, row: Tensor) -> Tensor:
    x = a @ row
    return torch.linalg.vector_norm(a.T @ (x / torch.linalg.vector_norm(x)))


def update_factors(qs: list[Tensor], dense: tuple[bool, ...], v: Tensor, g: Tensor, lr: float,
                   normalizer: str, tiny: float) -> None:
    r"""One step of the whitening fit of :math:`P = Q^\top Q`, :math:`Q = \otimes_i Q_i`, from the
    probe :math:`V` and the gradient :math:`G` (both in the factors' shape):
    :math:`A = G \times_i Q_i`, :math:`B = V \times_i Q_i^{-\top}`, then for each factor
    :math:`Q_i \leftarrow Q_i - \frac{\mathrm{lr}}{\lVert A_{(i)} A_{(i)}^\top \pm B_{(i)}
    B_{(i)}^\top \rVert + \mathrm{tiny}}\, \mathrm{triu}(A_{(i)} A_{(i)}^\top - B_{(i)} B_{(i)}^\top)\, Q_i`
    (elementwise for a diagonal factor)."""
    order = g.dim()
    a, b = g, v
    for i, (q, full) in enumerate(zip(qs, dense)):
        if full:
            a = _along(a, i, lambda y, q=q: y @ q.T)
            b = _along(b, i, lambda y, q=q: torch.linalg.solve_triangular(
                q, y.reshape(-1, q.shape[0]), upper=True, left=False).reshape(y.shape))
        else:
            a, b = a * _diagonal(q, i, order), b / _diagonal(q, i, order)
    for i, (q, full) in enumerate(zip(qs, dense)):
        term1, term2 = _gram(a, i, full), _gram(b, i, full)
        scale_by = term1 + term2 if normalizer == "2nd" else term1 - term2
        if full:
            q.sub_(lr / (norm_lower_bound(scale_by) + tiny) * torch.triu(term1 - term2) @ q)
        else:
            q.sub_(lr / (scale_by.abs().max() + tiny) * (term1 - term2) * q)


def balance(qs: list[Tensor], when: Tensor | None = None) -> None:
    """Rescale the factors to a common max-abs (their geometric mean): the product is unchanged.
    ``when``: a boolean 0-d tensor beside the factors; where it is False each factor is
    multiplied by 1 instead, so that the decision is never read back to the host."""
    norms = [q.abs().max() for q in qs]
    gmean = torch.stack(norms).prod() ** (1 / len(qs))
    for q, n in zip(qs, norms):
        q.mul_(gmean / n if when is None else torch.where(when, gmean / n, 1.0))


def precondition(qs: list[Tensor], dense: tuple[bool, ...], g: Tensor) -> Tensor:
    r""":math:`P G = G \times_i Q_i^\top Q_i`."""
    for i, (q, full) in enumerate(zip(qs, dense)):
        g = _along(g, i, lambda y, q=q: y @ q.T @ q) if full else g * _diagonal(q * q, i, g.dim())
    return g


class PSGDKron(Optimizer):
    r"""PSGD with the Kronecker-factored whitening preconditioner (Li, 2018, "Preconditioned
    Stochastic Gradient Descent"; Li, 2024, "Stochastic Hessian Fittings with Lie Groups",
    arXiv:2402.11858), as the author's ``psgd_torch`` 0.6.1 (``Kron`` with
    ``preconditioner_type="whitening"``) runs it, with its keyword names and defaults (``lr``
    is its ``lr_params``).

    Each parameter :math:`W` (shape :math:`d_1 \times \cdots \times d_k`) keeps factors
    :math:`Q_i`, upper triangular (:math:`d_i \times d_i`) or diagonal (:math:`d_i`): a dim is
    diagonal when it has size 1, is larger than ``preconditioner_max_size``, or is larger than
    ``preconditioner_max_skew`` times the second-largest dim of the parameter (so a vector
    longer than ``preconditioner_max_skew`` is diagonal). They are initialized to
    :math:`s^{1/k} I`, with :math:`s` = ``preconditioner_init_scale``, or, when it is None (the
    default), :math:`s = (\mathrm{numel}(G_1) / \lVert G_1 \rVert^2)^{1/4}` from the first
    gradient (1 where that gradient is zero). Each step, with probability
    ``preconditioner_update_probability`` (and always at the first step when the scale comes
    from the gradient), the preconditioner :math:`P = Q^\top Q`, :math:`Q = \otimes_i Q_i`, takes
    one step towards whitening the gradient, :math:`P = \mathbb{E}[g g^\top]^{-1/2}` for the
    flattened gradient :math:`g`, from a random probe :math:`V \sim \mathcal{N}(0, I)`:

    .. math::
        A &= G_t \times_1 Q_1 \cdots \times_k Q_k, \qquad
        B = V \times_1 Q_1^{-\top} \cdots \times_k Q_k^{-\top} \\
        Q_i &\leftarrow Q_i - \frac{\mathrm{lr_{precond}}}{\lVert A_{(i)} A_{(i)}^\top
              + B_{(i)} B_{(i)}^\top \rVert + \mathrm{tiny}}\;
              \mathrm{triu}\big(A_{(i)} A_{(i)}^\top - B_{(i)} B_{(i)}^\top\big)\, Q_i

    (:math:`X_{(i)}`: the dim-i unfolding; for a diagonal factor, the diagonals and
    :math:`\max|\cdot|`; the norm is a cheap lower bound of the spectral norm;
    ``step_normalizer="1st"`` normalizes by the difference instead of the sum, with which the
    author uses ``lr_preconditioner=0.01``). Before the fit, with probability 1/100, a parameter
    of two or more dims rescales its factors to their geometric-mean max-abs (the product is
    unchanged). Then

    .. math::
        M_t = \mu M_{t-1} + (1 - \mu) G_t, \qquad
        W_t = W_{t-1} - \mathrm{lr}\; M_t \times_1 Q_1^\top Q_1 \cdots \times_k Q_k^\top Q_k

    with :math:`M_t = G_t` when ``momentum`` :math:`\mu` = 0 (the default). Weight decay is the
    base class's (``weight_decay_mode="decoupled"`` by default, off).

    Randomness is reproducible and independent of torch's global generator. The probe (drawn
    in float32, then cast) and the balance draw of a parameter at step :math:`t` come from a
    ``torch.Generator`` on the parameter's device seeded from (``seed``, the parameter's shape,
    :math:`t`); whether the preconditioner is fitted at step :math:`t` comes from one seeded from
    (``seed``, :math:`t`), shared by the parameters of the group. So a parameter's draws depend
    on nothing but these: not on its position, its param group, its dtype or the other
    parameters; a resumed run (``step`` is in the state) draws exactly what the uninterrupted
    one would, and every replica of a DDP run draws alike. Parameters of the same shape draw
    the same probe at the same step; each preconditioner is fitted on its own, so no
    expectation changes. Another ``seed`` gives another, equally valid, run.

    State: ``step``, ``Q`` (the factors, flattened into one tensor) and, when ``momentum`` > 0,
    ``momentum_buffer``. Eager only (per-tensor factors): ``fused=True`` is refused. State bytes
    per parameter of an (m, n) float32 matrix with two dense factors: :math:`4\,(m/n + n/m)`
    (8 for a square one, 10 for 64 x 32), plus 4 with momentum; a diagonal factor of size d
    costs 4d bytes. DTensor parameters (FSDP2, tensor parallel): by owner compute
    (:mod:`optforge.distributed_matrix`): each parameter's whole gradient goes to one owner rank,
    which keeps ``Q`` and the momentum whole and returns the direction's shards.

    Differences from the author's code: only the whitening preconditioner (the Newton type needs
    Hessian-vector products from a closure); ``grad_clip_max_norm`` is not provided (clip the
    gradient before the step if needed); ``tiny`` is the smallest normal number of each
    parameter's dtype (the author's: of the widest-range dtype among all the parameters); the
    fit runs in float32 for bf16/fp16 parameters; and the random draws come from the generators
    above rather than torch's global one.
    """

    constraints = dict(momentum=unit_interval, lr_preconditioner=non_negative,
                       preconditioner_max_size=non_negative_or_inf,
                       preconditioner_max_skew=non_negative_or_inf,
                       preconditioner_init_scale=optional(positive),
                       preconditioner_update_probability=probability,
                       step_normalizer=one_of("2nd", "1st"), seed=integer_at_least(0))
    state_kinds = dict(Q="full")
    supports_complex = False
    whole_matrices = True
    owner_state = ("Q", "momentum_buffer")
    no_fused_reason = "it fits Kronecker factors to each whole tensor (triangular solves and matrix products)"

    def __init__(self, params: ParamsT, lr: float = 1e-3, lr_preconditioner: float = 0.1,
                 momentum: float = 0.0, preconditioner_max_size: float = float("inf"),
                 preconditioner_max_skew: float = 10.0, preconditioner_init_scale: float | None = None,
                 preconditioner_update_probability: float = 1.0, step_normalizer: str = "2nd",
                 weight_decay: float = 0.0, seed: int = 0, *, weight_decay_mode: str = "decoupled",
                 maximize: bool = False, fused: bool = False) -> None:
        super().__init__(params, dict(
            lr=lr, lr_preconditioner=lr_preconditioner, momentum=momentum,
            preconditioner_max_size=preconditioner_max_size, preconditioner_max_skew=preconditioner_max_skew,
            preconditioner_init_scale=preconditioner_init_scale,
            preconditioner_update_probability=preconditioner_update_probability,
            step_normalizer=step_normalizer, weight_decay=weight_decay, seed=seed,
            weight_decay_mode=weight_decay_mode, maximize=maximize, fused=fused))

    def state_names_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("Q", "momentum_buffer") if group["momentum"] > 0 else ("Q",)

    def state_shape(self, group: dict[str, Any], p: Tensor, name: str) -> tuple[int, ...]:
        return (Factors.of(group, p).numel,) if name == "Q" and p.numel() else tuple(p.shape)

    def init_state(self, group: dict[str, Any], p: Tensor, name: str) -> Tensor:
        return p.new_zeros(self.state_shape(group, p, name))

    def prepare(self, group: dict[str, Any], b: Any) -> Work:
        for x, st in zip(b.params, b.states):     # checked before the bucket's steps advance
            if x.numel() and "Q" in st and st["Q"].numel() != Factors.of(group, x).numel:
                raise ValueError(f"PSGDKron: the preconditioner state of a parameter of shape "
                                 f"{tuple(x.shape)} does not fit preconditioner_max_size / "
                                 "preconditioner_max_skew: they cannot change after the first step")
        return super().prepare(group, b)

    def update(self, group, p, g, s, t):
        # Whole tensors: on the owner of each under FSDP2 (optforge.distributed_matrix), which
        # keeps its factors and momentum whole; the step itself runs on every rank's shard.
        fit_at = {k: bool(torch.rand((), generator=draw_generator("cpu", group["seed"], "fit", int(k)))
                          < group["preconditioner_update_probability"]) for k in set(map(int, t))}
        names = [n for n in self.state_names_for(group) if n in s]
        states = [{"step": k, **{n: s[n][i] for n in names}} for i, k in enumerate(t)]
        directions = map_matrices(self, group, p, g, self._directions(group, fit_at), states=states,
                                  batch=False)
        lr = float(group["lr"])
        for x, d in zip(p, directions):
            if d.numel():
                local(x).sub_(d.mul_(lr))                                # W -= lr P M

    def _directions(self, group: dict[str, Any], fit_at: dict[int, bool]):
        return lambda grads, states: self._direction(group, fit_at, grads[0], states[0])[None]

    def _direction(self, group: dict[str, Any], fit_at: dict[int, bool], grad: Tensor,
                   st: dict[str, Tensor]) -> Tensor:
        """One whole tensor's preconditioned direction P M (before the lr), fitting its factors."""
        mu, init_scale, k = group["momentum"], group["preconditioner_init_scale"], int(st["step"])
        shape = tuple(grad.shape)
        factors = Factors.of(group, grad)
        qs = factors.views(st["Q"])
        grad = grad.reshape(factors.shape)
        if k == 1:
            self._init_factors(qs, factors, grad, init_scale)
        if fit_at[k] or (k == 1 and init_scale is None):
            draws = draw_generator(grad.device, group["seed"], shape, k)
            v = probe(grad, draws)
            if len(shape) > 1:
                coin = torch.rand((), generator=draws, device=grad.device) < BALANCE_PROBABILITY
                if grad.device.type not in HOST_DECIDES:
                    balance(qs, when=coin)          # a Python ``if`` would wait for the device
                elif coin:
                    balance(qs)
            self._fit(group, qs, factors.dense, v, grad)
        if mu > 0:
            m = st["momentum_buffer"]
            m.mul_(mu).add_(grad.reshape(m.shape), alpha=1 - mu)    # M = mu M + (1 - mu) G
            grad = m.view(factors.shape)
        return precondition(qs, factors.dense, grad).reshape(shape)

    @staticmethod
    def _fit(group: dict[str, Any], qs: list[Tensor], dense: tuple[bool, ...], v: Tensor,
             grad: Tensor) -> None:
        """``update_factors``, in float32 for bf16/fp16 params (triangular solves need it)."""
        if grad.dtype not in LOW_PRECISION:
            update_factors(qs, dense, v, grad, group["lr_preconditioner"], group["step_normalizer"],
                           torch.finfo(grad.dtype).tiny)
            return
        work = [q.float() for q in qs]
        update_factors(work, dense, v.float(), grad.float(), group["lr_preconditioner"],
                       group["step_normalizer"], torch.finfo(torch.float32).tiny)
        for q, w in zip(qs, work):
            q.copy_(w)

    @staticmethod
    def _init_factors(qs: list[Tensor], factors: Factors, grad: Tensor, init_scale: float | None) -> None:
        """Each factor to :math:`s^{1/k} I` (a diagonal: :math:`s^{1/k}`)."""
        if init_scale is None:
            squares = (grad * grad).sum()
            scale = (torch.where(squares > 0, grad.numel() / squares, 1.0)) ** 0.25
        else:
            scale = init_scale
        scale = scale ** (1 / len(qs))
        for q, full in zip(qs, factors.dense):
            ones = torch.eye(len(q), dtype=q.dtype, device=q.device) if full else torch.ones_like(q)
            q.copy_(scale * ones)


register(PSGDKron, "PSGD Kron: SGD with a learned Kronecker-factored whitening preconditioner (Li, 2018)",
         name="psgd_kron", aliases=("kron",), elementwise=False, compare_lr=1e-3)
