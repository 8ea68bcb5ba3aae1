"""Muon: momentum orthogonalized by Newton-Schulz, with an AdamW fallback for non-matrix params."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import scratch
from ..base import Optimizer, ParamsT
from ..constraints import (
    beta_tuple,
    boolean,
    integer_at_least,
    non_negative,
    one_of,
    optional,
    real_tuple,
    unit_interval,
)
from ..distributed import is_dtensor, local
from ..distributed_matrix import map_matrices
from ..registry import register
from ..tensorlist import TensorList
from .newton_schulz import NS_COEFFICIENTS, Slots, iterate_bytes, orthogonalize, round_up, work_bytes

__all__ = ["DEFAULT_ADAMW_NAMES", "DEFAULT_HEAD_NAMES", "Muon", "muon_param_groups", "orthogonalize"]

NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64, "param": None}
#: Module names (last component) taken for output heads by :func:`muon_param_groups`.
DEFAULT_HEAD_NAMES = ("head", "lm_head", "classifier", "fc_out", "output", "out_proj_head")
#: Parameter-name patterns sent to AdamW by :func:`muon_param_groups` (Jordan's rule: embeddings
#: held as plain parameters, e.g. ``pos_embed``).
DEFAULT_ADAMW_NAMES = ("*embed*",)


def _lr_ratio(adjust_lr_fn: str | None, rows: int, cols: int) -> float:
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))            # Moonshot: update RMS ~ AdamW's 0.2
    return math.sqrt(max(1.0, rows / cols))                 # Jordan: sqrt(max(1, A/B))


class Muon(Optimizer):
    r"""Muon (Jordan, 2024, "Muon: An optimizer for hidden layers in neural networks"), as
    ``torch.optim.Muon``, with the AdamW fallback of Jordan's ``MuonWithAuxAdam`` chosen per
    param group.

    For a hidden-layer matrix :math:`W` of shape :math:`A \times B` (conv kernels viewed as
    (out, in * kernel size)), with :math:`\mu` = ``momentum``:

    .. math::
        B_t &= \mu B_{t-1} + (1 - \mu) g_t, \qquad
        U_t = \begin{cases} (1 - \mu) g_t + \mu B_t & \text{nesterov} \\ B_t & \text{else} \end{cases} \\
        O_t &= \mathrm{NS}_{k}^{(a,b,c)}(U_t) \approx \text{the orthogonal factor of } U_t
            \quad (\text{see } :func:`orthogonalize`) \\
        W_t &= W_{t-1}(1 - \mathrm{lr}\,\lambda) - \mathrm{lr}\,\rho(A, B)\, O_t

    with :math:`\rho = \sqrt{\max(1, A/B)}` (``adjust_lr_fn="original"`` or None, Jordan's) or
    :math:`\rho = 0.2\sqrt{\max(A, B)}` (``"match_rms_adamw"``, Liu et al., 2025, "Muon is
    Scalable for LLM Training": lr and decay tuned for AdamW carry over).

    Params routed to the fallback get AdamW (Loshchilov & Hutter) with the group's ``lr`` and
    ``weight_decay``, ``adamw_betas`` and ``adamw_eps``. The param-group key ``use_muon`` (a
    group key, as in Jordan's ``MuonWithAuxAdam``; not a constructor argument) routes:

    - ``True``: every param is Muon's; a param with fewer than 2 dims is a ValueError.
    - ``False``: every param gets AdamW (embeddings, output heads, gains, biases).
    - ``None`` (the default, e.g. a plain list of params): params with >= 2 dims get Muon,
      the others AdamW, all with the group's lr. Embeddings and output heads should not get
      Muon: build the groups with :func:`muon_param_groups` (``create_optimizer(model,
      "muon")`` does), which also lets the AdamW groups have their own lr.

    ``ns_coefficients`` (a, b, c): the quintic's coefficients, default Jordan's
    (3.4445, -4.7750, 2.0315), as torch's.

    ``ns_dtype``: the dtype the Newton-Schulz iteration runs in: ``"bfloat16"`` (the default,
    as Jordan's and torch's: it is stable in bf16 and fast on accelerators and on CPUs with
    native bf16 matmuls, AVX512-BF16 or AMX), ``"float32"`` (faster on CPUs without them, whose
    bf16 matmuls are emulated: check with ``benchmarks/muon_speed.py``), ``"float64"``, or
    ``"param"``: the parameter's dtype (exact float64 runs, for parity tests).
    The signature is ``torch.optim.Muon``'s, with its defaults (lr 1e-3, weight decay 0.1;
    Jordan's reference uses lr 0.02 and no decay), then optforge's keyword-only options; the
    AdamW fallback's defaults are Jordan's (betas (0.9, 0.95), eps 1e-10), the iteration
    torch's (its eps, its ``addmm`` form). torch's Muon refuses parameters that are not
    matrices; here vectors and scalars take the AdamW fallback, and conv kernels are Muon's.
    Jordan's reference scales conv kernels by their last two dims (kernel height / width);
    here :math:`A, B` are those of the flattened matrix. State: ``step``, ``momentum_buffer``
    (Muon), ``exp_avg``, ``exp_avg_sq`` (AdamW); in a ``use_muon=None`` group holding both
    kinds, a param's unused entries are empty tensors. State dicts move both ways with
    torch.optim.Muon (whose state has no ``step``). Same-shape matrices of a (device, dtype)
    bucket are orthogonalized as one stack, in stacks of up to ``ns_batch_numel`` elements (a
    class attribute; 0: one matrix at a time): one batched matmul per iteration step instead of
    one per matrix, and a step's temporaries are those of one stack: the stack, the other
    iterate, the Gram matrices and one matrix's temporary in the parameter's dtype, in one
    buffer sized for the group's largest stack (with bf16 iterations 1.3x that stack's float32
    bytes for 4:1 matrices, 2x for square ones, whose Gram matrices are as large). On CPU,
    where that is at most 4 bytes per stacked parameter and the step makes no gradient
    temporary (``maximize``, coupled decay), the buffer comes from the optimizer's scratch pool
    (:mod:`optforge.scratch`) and is kept between steps, so that later steps do not page-fault
    fresh memory (``optforge.scratch.release(opt)`` frees it). Eager only; ``fused=True`` is refused. Under
    FSDP2 / tensor parallel (DTensor params) the momentum is sharded like the params and each
    matrix is orthogonalized by one owner rank (:mod:`optforge.distributed_matrix`,
    docs/distributed.md).
    """

    no_fused_reason = "it orthogonalizes the update of each whole matrix (Newton-Schulz iterations)"
    constraints = dict(momentum=unit_interval, nesterov=boolean, ns_coefficients=real_tuple(3),
                       ns_steps=integer_at_least(1), eps=non_negative,
                       adjust_lr_fn=optional(one_of("original", "match_rms_adamw")),
                       ns_dtype=one_of(*NS_DTYPES), use_muon=optional(boolean),
                       adamw_betas=beta_tuple(2), adamw_eps=non_negative)
    supports_complex = False
    whole_matrices = True
    #: the state of the params Muon steps (the AdamW fallback's: ``exp_avg``, ``exp_avg_sq``)
    matrix_state: ClassVar[tuple[str, ...]] = ("momentum_buffer",)
    #: Plain matrices of one shape are orthogonalized together, in stacks of up to this many
    #: elements (at least one matrix); 0: one at a time. A stack's iterates are the step's
    #: only temporaries.
    ns_batch_numel: ClassVar[int] = 1 << 22
    #: A matrix's update can round differently with other same-shape matrices beside it in its
    #: bucket (a batched matmul's kernel may depend on the batch size).
    stacks_across_tensors: ClassVar[bool] = True

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-3, weight_decay: float = 0.1,
                 momentum: float = 0.95, nesterov: bool = True,
                 ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS, eps: float = 1e-7,
                 ns_steps: int = 5, adjust_lr_fn: str | None = None, *, ns_dtype: str = "bfloat16",
                 adamw_betas: tuple[float, float] = (0.9, 0.95), adamw_eps: float = 1e-10,
                 weight_decay_mode: str = "decoupled", maximize: bool = False, fused: bool = False) -> None:
        super().__init__(params, dict(
            lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
            ns_coefficients=ns_coefficients, ns_steps=ns_steps, eps=eps, adjust_lr_fn=adjust_lr_fn,
            ns_dtype=ns_dtype, use_muon=None, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
            weight_decay_mode=weight_decay_mode, maximize=maximize, fused=fused))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["use_muon"]:
            flat = [p for p in group["params"] if p.dim() < 2]
            if flat:
                self.param_groups.pop()
                raise ValueError(
                    f"{type(self).__name__}: a use_muon=True param group holds a parameter of shape "
                    f"{tuple(flat[0].shape)}; "
                    "it orthogonalizes matrices (>= 2 dims). Put vectors and scalars in a use_muon=False "
                    "(AdamW) group, e.g. with optforge.muon_param_groups(model), or leave use_muon=None "
                    "to route them to AdamW automatically")

    @staticmethod
    def _is_muon(group: dict[str, Any], p: Tensor) -> bool:
        return group["use_muon"] is not False and p.dim() >= 2

    def state_names_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        kinds = {self._is_muon(group, p) for p in group["params"]}
        muon = self.matrix_state if True in kinds else ()
        return muon + (("exp_avg", "exp_avg_sq") if False in kinds else ())

    def init_state(self, group: dict[str, Any], p: Tensor, name: str) -> Tensor:
        if (name in self.matrix_state) != self._is_muon(group, p) and p.numel():
            return p.new_zeros(0)                  # a placeholder: the other kind's state
        return torch.zeros_like(p, memory_format=torch.preserve_format)

    def state_shape(self, group: dict[str, Any], p: Tensor, name: str) -> tuple[int, ...]:
        used = (name in self.matrix_state) == self._is_muon(group, p) or not p.numel()
        return tuple(p.shape) if used else (0,)

    def decay_lr(self, group: dict[str, Any], t: list[float]) -> float:
        return 0.0    # "decoupled": applied in update(), with each param's step; the base's is a no-op

    def update(self, group, p, g, s, t):
        lr = float(group["lr"])
        # W (1 - lr wd) before the step, as torch's Muon and AdamW, each param while it is at hand
        decay = 1 - lr * group["weight_decay"] if group["weight_decay_mode"] == "decoupled" else 1.0
        muon = [i for i, x in enumerate(p) if self._is_muon(group, x)]
        adamw = [i for i, x in enumerate(p) if not self._is_muon(group, x)]
        if muon:
            self._muon(group, lr, decay, [p[i] for i in muon], [g[i] for i in muon],
                       {name: [s[name][i] for i in muon] for name in self.matrix_state if name in s})
        if adamw:
            pick = lambda xs: TensorList(xs[i] for i in adamw)   # noqa: E731
            if decay != 1:
                pick(p).mul_(decay)
            self._adamw(group, lr, pick(p), pick(g), pick(s["exp_avg"]), pick(s["exp_avg_sq"]),
                        [t[i] for i in adamw])

    def _muon(self, group, lr, decay, params, grads, state):
        bufs = state["momentum_buffer"]
        plain = [i for i, p in enumerate(params) if not is_dtensor(p)]
        stacks = _same_shape_stacks(plain, params, self.ns_batch_numel)
        if stacks:
            dtype = NS_DTYPES[group["ns_dtype"]] or params[0].dtype
            # kept between steps only where the step holds no gradient temporary (maximize,
            # coupled decay) that the scratch pool may keep too: at most 4 bytes per param in all
            nbytes = max(_stack_work_bytes([params[i] for i in stack], dtype) for stack in stacks)
            numel = sum(params[i].numel() for stack in stacks for i in stack)
            keep = all(g is p.grad for p, g in zip(params, grads)) and nbytes <= HELD_BYTES_PER_PARAM * numel
            work = _work_buffer(nbytes, keep, params[0].device)
        for stack in stacks:
            self._muon_stack(group, lr, decay, [params[i] for i in stack], [grads[i] for i in stack],
                             [bufs[i] for i in stack], work)
        sharded = [i for i, p in enumerate(params) if is_dtensor(p)]
        if sharded:
            self._muon_sharded(group, lr, decay, [params[i] for i in sharded], [grads[i] for i in sharded],
                               [bufs[i] for i in sharded])

    def _muon_stack(self, group, lr, decay, params, grads, bufs, work):
        """Plain matrices of one shape: each U_t written straight into one stack in the
        iteration's dtype, the stack orthogonalized in one batched iteration, then each param
        decayed and stepped in turn (it is in cache for both). The stack and the iterates lie
        in ``work``, and so does one param-sized temporary (to round U_t and to read O_t back
        when the iteration's dtype is not the param's), where the Gram matrices go while the
        iteration runs (:func:`_stack_work_bytes`)."""
        mu, shape = group["momentum"], params[0].shape
        dtype = NS_DTYPES[group["ns_dtype"]] or params[0].dtype
        stacked = _ns_shape(params)
        rows, cols = stacked[-2:]
        slots = Slots(work, dtype, params[0].device)
        u = slots.take((len(params), *shape))
        ns_work = slots.rest()
        tmp = None
        if dtype != params[0].dtype:
            slots.skip(iterate_bytes(stacked, dtype, in_place=True))
            tmp = slots.take(tuple(shape), params[0].dtype)
        for x, g, buf in zip(u.unbind(0), grads, bufs):
            buf.lerp_(g, 1 - mu)                                        # B_t = mu B + (1 - mu) g
            if group["nesterov"]:                                       # U_t = (1 - mu) g + mu B_t
                torch.lerp(g, buf, mu, out=x if tmp is None else tmp)
                if tmp is not None:
                    x.copy_(tmp)                                        # rounded to the iteration's dtype
            else:
                x.copy_(buf)                                            # U_t = B_t
        o = orthogonalize(u.view(stacked), group["ns_coefficients"], group["ns_steps"], group["eps"], None,
                          overwrite=True, work=ns_work)
        alpha = -lr * _lr_ratio(group["adjust_lr_fn"], rows, cols)
        for p, x in zip(params, o.view(u.shape).unbind(0) if len(params) > 1 else [o.reshape(shape)]):
            if decay != 1:
                p.mul_(decay)
            p.add_(x if tmp is None else tmp.copy_(x), alpha=alpha)    # W_t = W - lr rho O_t

    def _muon_sharded(self, group, lr, decay, params, grads, bufs):
        """DTensor matrices: the momentum on the local shards, each whole U_t orthogonalized on
        its owner (optforge.distributed_matrix), the step on the local shards."""
        mu = group["momentum"]
        inputs = []
        for g, buf in zip(grads, bufs):
            buf.lerp_(g, 1 - mu)                                        # B_t = mu B + (1 - mu) g
            inputs.append(g.lerp(buf, mu) if group["nesterov"] else buf)   # U_t = (1 - mu) g + mu B_t

        def orthogonalized(u, _):                   # a stack of whole U_t (conv kernels flattened)
            x = u.flatten(2) if len(u) > 1 else u[0].flatten(1)
            return self._orthogonalized(group, x).reshape(u.shape)

        for p, o in zip(params, map_matrices(self, group, params, inputs, orthogonalized)):
            if decay != 1:
                local(p).mul_(decay)
            if o.numel():
                ratio = _lr_ratio(group["adjust_lr_fn"], p.shape[0], math.prod(p.shape[1:]))
                local(p).add_(o, alpha=-lr * ratio)                     # W_t = W - lr rho O_t

    @staticmethod
    def _orthogonalized(group, x):
        return orthogonalize(x, group["ns_coefficients"], group["ns_steps"], group["eps"],
                             NS_DTYPES[group["ns_dtype"]])

    @staticmethod
    def _adamw(group, lr, p, g, m, v, t):
        (b1, b2), eps = group["adamw_betas"], group["adamw_eps"]
        m.lerp_(g, 1 - b1)                                         # m_t = b1 m + (1 - b1) g
        v.mul_(b2).addcmul_(g, g, value=1 - b2)                    # v_t = b2 v + (1 - b2) g^2
        bc2 = [math.sqrt(1 - b2**k) for k in t]
        # x -= lr m_hat / (sqrt(v_hat) + eps), the bias corrections folded into the scalars
        p.addcdiv_(m, v.sqrt().div_(bc2).add_(eps), [-lr / (1 - b1**k) for k in t])


def _same_shape_stacks(items: list[int], params, max_numel: int) -> list[list[int]]:
    """``items`` (indices into ``params``) grouped by shape, in stacks of at most ``max_numel``
    elements (at least one each); empty params are left out."""
    by_shape: dict[tuple[int, ...], list[list[int]]] = {}
    for i in items:
        p = params[i]
        if not p.numel():
            continue
        stacks = by_shape.setdefault(tuple(p.shape), [[]])
        if stacks[-1] and (len(stacks[-1]) + 1) * p.numel() > max_numel:
            stacks.append([])
        stacks[-1].append(i)
    return [stack for stacks in by_shape.values() for stack in stacks]


def _ns_shape(params: list[Tensor]) -> tuple[int, ...]:
    """The shape these same-shape params are orthogonalized in: each a (rows, cols) matrix,
    several as one (n, rows, cols) stack."""
    matrix = (params[0].shape[0], math.prod(params[0].shape[1:]))
    return (len(params), *matrix) if len(params) > 1 else matrix


def _stack_work_bytes(params: list[Tensor], dtype: torch.dtype) -> int:
    """Bytes of :meth:`Muon._muon_stack`'s work buffer for these same-shape params: the stack,
    then the iteration's work, whose Gram region holds the param-sized temporary outside it."""
    p, n, stacked = params[0], len(params), _ns_shape(params)
    tmp = round_up(p.numel() * p.element_size()) if dtype != p.dtype else 0
    return round_up(n * p.numel() * dtype.itemsize) + max(
        work_bytes(stacked, dtype, in_place=True), iterate_bytes(stacked, dtype, in_place=True) + tmp)


#: The most bytes per stacked parameter that the step's work buffer may keep between steps, as
#: :mod:`optforge.scratch` bounds what its pool keeps.
HELD_BYTES_PER_PARAM = 4


def _work_buffer(nbytes: int, keep: bool, device: torch.device) -> Tensor:
    """A byte buffer for the step's stacks: with ``keep`` on CPU, a buffer of the optimizer's
    scratch pool, kept for the next steps (optforge.scratch) so that they do not page-fault
    fresh memory; else a new one."""
    pool = scratch.active() if device.type == "cpu" else None
    if pool is None or not keep:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    return pool.take_new((nbytes,), torch.uint8, device)


# ---- splitting a model's parameters -----------------------------------------------------------
def _match(name: str, patterns: Iterable[str]) -> bool:
    last = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(last, pat) for pat in patterns)


def _adamw_by_structure(model: nn.Module, head_names: Iterable[str]) -> set[int]:
    """ids of the params Muon should not get: embeddings, output heads, depthwise convs."""
    out: set[int] = set()
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    vocab = {m.num_embeddings for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    heads = [m for n, m in linears if _match(n, head_names) or m.out_features in vocab]
    if not heads and linears:
        heads = [linears[-1][1]]             # no named head or vocab projection: the final Linear
    for m in model.modules():
        conv = isinstance(m, nn.modules.conv._ConvNd)
        depthwise = conv and m.groups > 1 and m.groups == m.in_channels
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) or depthwise or any(m is h for h in heads):
            out.update(id(p) for p in m.parameters(recurse=False))
    return out


def muon_param_groups(model: nn.Module, groups: list[dict[str, Any]] | None = None, *,
                      head_names: Iterable[str] = DEFAULT_HEAD_NAMES,
                      adamw_names: Iterable[str] = DEFAULT_ADAMW_NAMES,
                      use_muon: Callable[[str, Tensor], bool | None] | None = None,
                      adamw_lr: float | None = None) -> list[dict[str, Any]]:
    """Split ``model``'s params into Muon groups (``use_muon=True``) and AdamW groups
    (``use_muon=False``), for :class:`Muon`.

    AdamW gets: params with fewer than 2 dims; ``nn.Embedding`` weights; output heads (each
    ``nn.Linear`` whose name, or its last component, matches ``head_names`` (fnmatch patterns),
    or whose ``out_features`` is an embedding's vocabulary size; if there is none, the model's
    last ``nn.Linear``); depthwise convs (``groups == in_channels``); params whose name (or its
    last component) matches an ``adamw_names`` pattern (default ``"*embed*"``). Muon gets the
    other params with >= 2 dims. ``use_muon(name, param)``, when given, decides first (True /
    False; None: the rules above), except that params with fewer than 2 dims always get AdamW.

    ``groups``: param groups to split (dicts with "params", e.g. from
    ``param_groups_weight_decay``); each yields up to two groups that keep its other keys.
    Default: one group of the model's trainable params. ``adamw_lr`` sets the AdamW groups' lr
    (default: the optimizer's lr). Frozen params (``requires_grad=False``) are left out.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    structural = _adamw_by_structure(model, tuple(head_names))
    extra = tuple(adamw_names)

    def to_muon(p: Tensor) -> bool:
        name = names.get(id(p), "")
        if use_muon is not None:
            choice = use_muon(name, p)
            if choice is not None:
                return bool(choice) and p.dim() >= 2
        return p.dim() >= 2 and id(p) not in structural and not _match(name, extra)

    if groups is None:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    out = []
    for group in groups:
        params = list(group["params"])
        for flag in (True, False):
            chosen = [p for p in params if to_muon(p) == flag]
            if chosen:
                extra_keys = {"lr": adamw_lr} if not flag and adamw_lr is not None else {}
                out.append({**group, "params": chosen, "use_muon": flag, **extra_keys})
    return out


# compare_lr: Jordan's lr 0.02 (the class default is torch's, 1e-3)
register(Muon, "Muon: momentum orthogonalized by Newton-Schulz for matrices, AdamW for the rest "
         "(Jordan, 2024)", elementwise=False, compare_lr=0.02,
         prepare_groups=lambda model, groups: muon_param_groups(model, groups))
