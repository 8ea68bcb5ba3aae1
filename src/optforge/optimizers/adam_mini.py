"""Adam-mini: Adam with one second-moment value per block of a parameter (a head, a row, a tensor)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..base import Optimizer, ParamsT
from ..constraints import beta_tuple, integer_at_least, non_negative, one_of, optional
from ..distributed import block_index, block_sums, check_blocks, is_dtensor, local
from ..registry import register

__all__ = ["AdamMini", "partition_by_name"]

PARTITIONS = ("element", "row", "head", "tensor")
#: Lower-case name substrings -> blocks; the first rule that matches a parameter's name wins,
#: names no rule matches are one block per tensor (the authors' lists).
NAME_RULES = (
    ("element", ("bias",)),
    ("head", ("q_proj", "k_proj", "wq", "wk", "query", "key")),
    ("row", ("embed", "embd", "wte",                 # embeddings: one block per token
             "lm_head", "output", "final_layer",      # output layers: per token
             "v_proj", "wv", "value",                 # values: per output neuron
             "o_proj", "wo", "attn.proj",             # attention output projections: per neuron
             "feed_forward", "linear", "mlp")),       # MLPs: per neuron
)
#: Lower-case name substrings of the params a plain ``named_parameters()`` list does not decay.
NO_DECAY_NAMES = ("norm", "ln", "bias")


def partition_by_name(name: str) -> str:
    """The block kind Adam-mini gives a parameter named ``name``: "element", "head", "row" or
    "tensor" (see :data:`NAME_RULES`)."""
    name = name.lower()
    return next((kind for kind, keys in NAME_RULES if any(k in name for k in keys)), "tensor")


def _split_decay(params: ParamsT) -> ParamsT:
    """A plain list of (name, tensor) pairs -> the authors' two groups: decayed, and not (names
    with :data:`NO_DECAY_NAMES`). Anything else as it is (a Tensor gets torch's TypeError)."""
    if isinstance(params, Tensor):
        return params
    params = list(params)
    if not params or not all(isinstance(x, tuple) for x in params):
        return params
    exempt = [any(k in n.lower() for k in NO_DECAY_NAMES) for n, _ in params]
    decay = [x for x, no in zip(params, exempt) if not no]
    rest = [x for x, no in zip(params, exempt) if no]
    return [g for g in ({"params": decay}, {"params": rest, "weight_decay": 0.0}) if g["params"]]


class AdamMini(Optimizer):
    r"""Adam-mini (Zhang et al., 2025, "Adam-mini: Use Fewer Learning Rates To Gain More",
    arXiv:2406.16793): Adam whose second moment is one number per block of a parameter, the
    mean of the squared gradient over the block, as the authors' ``adam-mini`` 1.1.1.

    Each parameter is split into blocks :math:`B_1, \dots, B_K`; with :math:`k(i)` the block of
    entry :math:`i`, and :math:`\lambda` = ``weight_decay``:

    .. math::
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        v_{t,k} = \beta_2 v_{t-1,k} + (1 - \beta_2) \tfrac{1}{|B_k|} \textstyle\sum_{i \in B_k} g_{t,i}^2 \\
        \theta_{t,i} &= \theta_{t-1,i}(1 - \mathrm{lr}\,\lambda) - \mathrm{lr}\,
            \frac{m_{t,i} / (1 - \beta_1^t)}{\sqrt{v_{t,k(i)} / (1 - \beta_2^t)} + \epsilon}

    The blocks come from the parameter's name (pass ``model.named_parameters()``, or param
    groups whose "params" are (name, tensor) pairs), by the authors' rules
    (:func:`partition_by_name`, lower-case substrings, first match wins):

    - ``"element"``, names with ``bias``: one block per entry (Adam).
    - ``"head"``, query and key weights (``q_proj``, ``k_proj``, ``wq``, ``wk``, ``query``,
      ``key``): one block per attention head, i.e. per ``dim * dim // n_heads`` consecutive
      entries (so grouped-query keys with fewer heads need nothing more).
    - ``"row"``, embeddings, output layers, values, attention output projections, MLPs
      (``embed``, ``embd``, ``wte``, ``lm_head``, ``output``, ``final_layer``, ``v_proj``,
      ``wv``, ``value``, ``o_proj``, ``wo``, ``attn.proj``, ``feed_forward``, ``linear``,
      ``mlp``): one block per row (token or output neuron; a tensor with more than 2 dims by
      its first dim).
    - ``"tensor"``, any other name (norm weights, ...), or no name: one block per tensor.

    The param-group key ``partition`` (``"element"``, ``"row"``, ``"head"`` or ``"tensor"``;
    not a constructor argument) gives every param of its group that kind instead. A vector
    whose name asks for rows or heads is one block (for rows, the authors' code raises an
    error). Built from a plain list of (name, tensor) pairs, as the authors' constructor takes it, params
    whose name contains ``norm``, ``ln`` or ``bias`` get no weight decay (a second param
    group); param groups keep the decay they give. ``create_optimizer(model, "adam_mini",
    dim=..., n_heads=...)`` names the params of the groups it builds (no decay for biases and
    norms, as for every optimizer).

    ``dim`` and ``n_heads``: the model's hidden size and number of attention heads (only
    the head blocks use them); a query or key weight whose size is not a multiple of
    ``dim * dim // n_heads`` is a ValueError. Differences from the authors' code: no
    ``n_kv_heads``, ``model_sharding`` or ``verbose`` arguments, no printed messages, and
    the block mean divides by the exact entry count (theirs rounds it to float32, exact up
    to 2**24 entries). State: ``step``, ``exp_avg`` (like the param) and ``exp_avg_sq``
    (like the param for "element" blocks, else one entry per block, shape (K, 1)): in float32,
    :math:`4 + 4/|B|` bytes per entry, i.e. 8 for "element" blocks (Adam's) and barely over 4
    otherwise (4.002 for the rows of a 2048-wide matrix), about half of AdamW's 8. Eager
    only; ``fused=True`` is refused. DTensor parameters (FSDP2, tensor parallel): a block's
    sum of squares is added up over every shard it spans (one all-reduce per bucket and step)
    and ``exp_avg_sq`` is replicated on every rank (a DTensor, one entry per block); "element"
    blocks are Adam on the shards.
    """

    no_fused_reason = "its second moment is a mean of squared gradients over each block of a tensor"
    constraints = dict(betas=beta_tuple(2), eps=non_negative, dim=integer_at_least(1),
                       n_heads=integer_at_least(1), partition=optional(one_of(*PARTITIONS)))
    state_names = ("exp_avg", "exp_avg_sq")
    supports_complex = False
    shard_reductions = True     # a block's mean over DTensor shards is reduced over the mesh

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, dim: int = 2048, n_heads: int = 32,
                 weight_decay_mode: str = "decoupled", maximize: bool = False, fused: bool = False) -> None:
        super().__init__(_split_decay(params), dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, dim=dim, n_heads=n_heads, partition=None,
            weight_decay_mode=weight_decay_mode, maximize=maximize, fused=fused))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            for p in group["params"]:
                self._blocks(group, p)
        except ValueError:
            self.param_groups.pop()
            raise

    def _blocks(self, group: dict[str, Any], p: Tensor) -> int:
        """The number of blocks of ``p`` (0: one per entry)."""
        kind, name = group["partition"], None
        if "param_names" in group:
            name = group["param_names"][next(i for i, q in enumerate(group["params"]) if q is p)]
        if kind is None:
            kind = partition_by_name(name) if name is not None else "tensor"
        if kind == "element":
            return 0
        if kind == "tensor" or p.dim() < 2:
            return 1
        if kind == "row":
            return p.shape[0]
        dim, heads = group["dim"], group["n_heads"]
        if (dim * dim) % heads or p.numel() % (dim * dim // heads):
            raise ValueError(f"AdamMini: {name or 'a parameter'} of shape {tuple(p.shape)} cannot be split "
                             f"into attention heads of dim * dim // n_heads entries (dim={dim}, "
                             f"n_heads={heads}): pass the model's dim and n_heads, or give its param group "
                             "another partition")
        return p.numel() // (dim * dim // heads)

    def _check_tensor_subclass(self, group: dict[str, Any], param: Tensor) -> None:
        super()._check_tensor_subclass(group, param)
        if is_dtensor(param) and param.numel() and self._blocks(group, param):
            check_blocks(type(self).__name__, param)         # before anything changes

    def state_shape(self, group: dict[str, Any], p: Tensor, name: str) -> tuple[int, ...]:
        blocks = self._blocks(group, p) if name == "exp_avg_sq" and p.numel() else 0
        return (blocks, 1) if blocks else tuple(p.shape)

    def init_state(self, group: dict[str, Any], p: Tensor, name: str) -> Tensor:
        shape = self.state_shape(group, p, name)
        if is_dtensor(p):           # sharded like the param, or one replicated entry per block
            if shape == tuple(p.shape):
                return torch.zeros_like(p)
            from torch.distributed.tensor import DTensor, Replicate

            return DTensor.from_local(local(p).new_zeros(shape), p.device_mesh,
                                      [Replicate()] * p.device_mesh.ndim, run_check=False)
        return p.new_zeros(shape)   # contiguous: blocks are views

    def update(self, group, p, g, s, t):
        (b1, b2), lr, eps = group["betas"], float(group["lr"]), group["eps"]
        m, v = s["exp_avg"], s["exp_avg_sq"]
        m.lerp_(g, 1 - b1)                                          # m_t = b1 m + (1 - b1) g
        sharded = [i for i, x in enumerate(p) if is_dtensor(x)]
        means = self._block_means(group, [p[i] for i in sharded], [g[i] for i in sharded])
        for i, mean in zip(sharded, means):
            self._update_shard(p[i], m[i], v[i], g[i], mean, t[i], lr, b1, b2, eps)
        for x, gx, mx, vx, k in zip(p, g, m, v, t):
            if is_dtensor(x) or not x.numel():
                continue
            n = vx.numel()
            vb = vx.view(n, 1)
            vb.mul_(b2).add_(gx.reshape(n, -1).square().mean(dim=1, keepdim=True), alpha=1 - b2)
            denom = vb.sqrt().div_(math.sqrt(1 - b2**k)).add_(eps)  # sqrt(v_t / (1 - b2^t)) + eps, per block
            step = -lr / (1 - b1**k)
            if x.is_contiguous():
                x.view(n, -1).addcdiv_(mx.view(n, -1), denom, value=step)
            else:            # e.g. a channels-last kernel: the blocks are not contiguous in its memory
                x.add_(mx.view(n, -1).div(denom).view(x.shape), alpha=step)

    def _block_means(self, group, ps, gs) -> list[Tensor | None]:
        """Each DTensor's per-block mean of g^2 over the whole tensor (None for blocks of one
        entry): a block's sum is added up over every shard it spans (``block_sums``, one
        all-reduce for the bucket, run by every rank, an empty shard included)."""
        blocks = [self._blocks(group, x) if x.numel() else 0 for x in ps]
        summed = [i for i, n in enumerate(blocks) if n]
        sums = block_sums([local(gs[i]).square() for i in summed], [ps[i] for i in summed],
                          [blocks[i] for i in summed])
        means: list[Tensor | None] = [None] * len(ps)
        for i, total in zip(summed, sums):
            means[i] = total.div_(ps[i].numel() // blocks[i])
        return means

    @staticmethod
    def _update_shard(p, m, v, g, mean, k, lr, b1, b2, eps) -> None:
        """The update of a DTensor's local shard. Blocks of one entry (``mean`` None): Adam on
        the shards (the state is sharded like the param). Larger blocks: the state is one
        replicated entry per block, updated by its block's ``mean`` of g^2 over the whole
        tensor, and each entry takes its block's denominator."""
        x, gx, mx, vx = local(p), local(g), local(m), local(v)
        step, bc2 = -lr / (1 - b1**k), math.sqrt(1 - b2**k)
        if mean is None:
            vx.mul_(b2).addcmul_(gx, gx, value=1 - b2)
            x.addcdiv_(mx, vx.sqrt().div_(bc2).add_(eps), value=step)
            return
        vb = vx.view(mean.numel())
        vb.mul_(b2).add_(mean, alpha=1 - b2)
        denom = vb.sqrt().div_(bc2).add_(eps)
        x.addcdiv_(mx, denom[block_index(p, mean.numel())].view(x.shape), value=step)


def _named_groups(model: nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [{**g, "params": [(names[id(p)], p) for p in g["params"]]} for g in groups]


# compare_lr: Adam's usual 1e-3 (also the default)
register(AdamMini, "Adam-mini: Adam with one second moment per attention head, row or tensor, chosen "
         "by parameter name (Zhang et al., 2025)", name="adam_mini", elementwise=False, compare_lr=1e-3,
         prepare_groups=_named_groups)
