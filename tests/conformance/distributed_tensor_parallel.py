"""FSDP2 x tensor parallel on a 2 x 2 mesh (4 ranks), for test_distributed.py: every optimizer
that takes DTensor parameters, L-BFGS, Adam-mini with blocks spanning shards, and the wrappers,
each trained on the mesh (``tensor_parallel``, run by distributed_checkpoint.run_group) and by
one process on the full batch (``reference``).

A case is a label: a registered name (foreach, its table kwargs), ``<name>-fused``,
``lookahead`` / ``sam`` / ``asam`` (around AdamW), ``lbfgs-<LBFGS_CASES key>`` or
``adam_mini-blocks``."""

from __future__ import annotations

import torch
from distributed_worker import (
    ADAM_MINI_BLOCKS,
    LBFGS_CASES,
    WRAPPED,
    adam_mini_blocks,
    data,
    flat,
    make_model,
    train,
    train_lbfgs,
    train_wrapped,
)

from helpers import optimizer_kwargs


def train_case(label: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
               loss_over_ranks: bool = False) -> None:
    """Train ``model`` with case ``label``'s optimizer; ``loss_over_ranks``: L-BFGS's closure
    returns the loss of the whole batch (the ranks' losses averaged)."""
    import optforge as of

    if label in WRAPPED:
        train_wrapped(label, model, x, y)
    elif label.startswith("lbfgs-"):
        opt = of.LBFGS(model.parameters(), **LBFGS_CASES[label.removeprefix("lbfgs-")])
        train_lbfgs(model, opt, x, y, loss_over_ranks=loss_over_ranks)
    elif label == "adam_mini-blocks":
        train(model, of.AdamMini(adam_mini_blocks(list(model.parameters())), **ADAM_MINI_BLOCKS), x, y)
    else:
        name, fused = label.removesuffix("-fused"), label.endswith("-fused")
        kwargs = {**optimizer_kwargs(name), **({"fused": True} if fused else {})}
        train(model, of.get_optimizer_info(name).cls(model.parameters(), **kwargs), x, y)


def reference(label: str) -> torch.Tensor:
    """One process, the full batch."""
    model = make_model()
    train_case(label, model, *data())
    return flat(model.parameters())


def tensor_parallel(label: str, rank: int) -> dict:
    """FSDP2 over "dp" and tensor parallelism over "tp" (the first Linear column-wise, the
    second row-wise: placements (_StridedShard(0), Shard(0)), (Shard(0), Shard(1)) and
    (Shard(0), Replicate())), the last Linear FSDP2 only (on the 1-D "dp" mesh)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = make_model()
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    train_case(label, model, *data(rank // 2), loss_over_ranks=True)   # a "tp" pair sees the same rows
    placements = sorted({(len(p.placements), repr(p.placements)) for p in model.parameters()})
    return {"params": flat(model.parameters()), "placements": [p for _, p in placements]}


# Other layouts, on a 1-D mesh of the 4 ranks and on a 2 x 2 mesh: a few tensors (the (5, 8)
# one split 2, 2, 1, 0 rows on 4 ranks) distributed from the whole ones, the same whole gradients
# distributed alike at each step.
SHAPES = ((8, 6), (5,), (5, 8), (1, 5))
LAYOUT_STEPS = 3
LAYOUTS = ("shard-1", "shard-0-shard-0", "shard-last-shard-0", "replicate-shard-0")
# the optimizers whose code depends on the layout: reductions over shards, whole matrices
LAYOUT_OPTIMIZERS = ("adafactor", "came", "lamb", "mars", "prodigy", "adam_mini", "muon", "soap", "shampoo")


def _placements(layout: str, ndim: int) -> list:
    from torch.distributed.tensor import Replicate, Shard

    return {"shard-1": [Shard(min(1, ndim - 1))],        # FSDP2 with shard_placement_fn -> Shard(1)
            "shard-0-shard-0": [Shard(0), Shard(0)],
            "shard-last-shard-0": [Shard(ndim - 1), Shard(0)],
            "replicate-shard-0": [Replicate(), Shard(0)]}[layout]   # HSDP


def whole_tensors(step: int | None) -> list[torch.Tensor]:
    """The parameters (step None) or the gradients of a step."""
    g = torch.Generator().manual_seed(100 if step is None else step)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]


def _step_with(name: str, params: list, grads_of) -> None:
    import optforge as of

    opt = of.get_optimizer_info(name).cls(params, **optimizer_kwargs(name))
    for step in range(LAYOUT_STEPS):
        for p, g in zip(params, grads_of(step)):
            p.grad = g
        opt.step()


def layout_reference(name: str) -> torch.Tensor:
    params = [torch.nn.Parameter(x) for x in whole_tensors(None)]
    _step_with(name, params, whole_tensors)
    return flat(params)


def layouts(rank: int) -> dict:
    """Each of LAYOUT_OPTIMIZERS on each of LAYOUTS: the whole parameters after the steps (or
    the traceback)."""
    import traceback

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    meshes = {1: init_device_mesh("cpu", (4,)), 2: init_device_mesh("cpu", (2, 2))}
    out = {}
    for layout in LAYOUTS:
        def spread(xs, layout=layout):
            placed = [_placements(layout, x.dim()) for x in xs]
            return [distribute_tensor(x, meshes[len(pl)], pl) for x, pl in zip(xs, placed)]
        for name in LAYOUT_OPTIMIZERS:
            try:
                params = [torch.nn.Parameter(x) for x in spread(whole_tensors(None))]
                _step_with(name, params, lambda step: spread(whole_tensors(step)))
                out[layout, name] = flat(params)
            except Exception:
                out[layout, name] = "error: " + traceback.format_exc()
    return out


def refusals(rank: int) -> dict:
    """Layouts an update on local shards cannot take: the ValueError, and whether the parameter
    and the state were left as they were. A gradient replicated beside a parameter sharded on
    dim 0 (elementwise optimizers redistribute it: their params after a step), and Adam-mini's
    blocks on shards that are not boxes (FSDP2's _StridedShard on a 1-D mesh: rows {r, r + 4}
    of rank r)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    import optforge as of

    mesh = init_device_mesh("cpu", (4,))
    whole, grad = whole_tensors(None)[0], whole_tensors(0)[0]
    out = {}

    def attempt(opt, p):
        before = p.to_local().clone()
        try:
            opt.step()
        except ValueError as err:
            return {"error": str(err), "unchanged": torch.equal(p.to_local(), before) and not opt.state}
        return {"error": None, "params": flat([p])}

    for name, fused in (("adamw", False), ("adamw", True), ("adan", True), ("lamb", False),
                        ("adafactor", False), ("adam_mini", False), ("soap", False)):
        p = torch.nn.Parameter(distribute_tensor(whole, mesh, [Shard(0)]))
        p.grad = distribute_tensor(grad, mesh, [Replicate()])
        kwargs = {**optimizer_kwargs(name), **({"fused": True} if fused else {})}
        out["replicated_grad", name + ("-fused" if fused else "")] = attempt(
            of.get_optimizer_info(name).cls([p], **kwargs), p)
    strided = [_StridedShard(0, split_factor=2)]
    rows = [rank, rank + 4]
    p = torch.nn.Parameter(DTensor.from_local(whole[rows].clone(), mesh, strided, run_check=False,
                                              shape=whole.shape, stride=whole.stride()))
    p.grad = DTensor.from_local(grad[rows].clone(), mesh, strided, run_check=False, shape=grad.shape,
                                stride=grad.stride())
    out["not_boxes", "adam_mini"] = attempt(
        of.AdamMini([{"params": [p], "partition": "head", "dim": 4, "n_heads": 2}], lr=0.1), p)
    return out


def replicated_grad_reference(name: str) -> torch.Tensor:
    """One step of ``name`` (``-fused``) on the whole (8, 6) tensor."""
    import optforge as of

    base = name.removesuffix("-fused")
    kwargs = {**optimizer_kwargs(base), **({"fused": True} if name.endswith("-fused") else {})}
    p = torch.nn.Parameter(whole_tensors(None)[0])
    p.grad = whole_tensors(0)[0]
    of.get_optimizer_info(base).cls([p], **kwargs).step()
    return flat([p])
