"""Low-bit optimizer state (``state_precision``) under FSDP2, HSDP and DDP, for
test_distributed.py: ``run_low_bit`` runs in its group of 2 ranks (and saves the checkpoints),
``resume_low_bit`` in its groups of 1 and 4. Each rank quantizes its local shard in blocks of
its own; two models:

- ``aligned``: the low-bit weights' shards on 2 ranks are whole blocks (256 of 512 entries:
  whole blocks of every code), so the blocks are the unsharded run's;
- ``uneven``: shards of 180 entries (blocks cut elsewhere than in one process), a quantized
  bias split 15 / 15 and a quantized (1, 30) weight whose shard on rank 1 is empty.
"""

from __future__ import annotations

import io
import os

import torch
import torch.distributed as dist
from torch import nn

STEPS, SAVED_AT = 5, 3
MIN_SIZE = {"aligned": 256, "uneven": 30}     # below it, full precision (the biases of "aligned")
#: fused=True too (a compile each): the paths without and with stochastic rounding
FUSED = ("int8", "int4")
#: (precision, fused, how): checkpoints resumed at the same world size
RESUMED = [("int8", False, "torch"), ("int4", True, "torch"), ("int4", False, "dcp"), ("fp8", False, "dcp")]


def make(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "aligned":
        layers = nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1)
        return nn.Sequential(*layers).double()
    return nn.Sequential(nn.Linear(12, 30), nn.Tanh(), nn.Linear(30, 1)).double()


def data(kind: str, rank: int | None = None, world: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 32 if kind == "aligned" else 12, generator=g, dtype=torch.float64)
    y = torch.randn(8, 1, generator=g, dtype=torch.float64)
    if rank is None:
        return x, y
    rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
    return x[rows], y[rows]


def optimizer(kind: str, params, precision: str | None, name: str = "adamw", fused: bool = False):
    from conformance_cases import optimizer_kwargs

    import optforge as of

    fused_kwargs = {"fused": True} if fused else {}
    opt = of.get_optimizer_info(name).cls(params, **optimizer_kwargs(name), **fused_kwargs)
    return opt.configure(state_precision=precision, min_quantized_size=MIN_SIZE[kind])


def train(model, opt, x, y, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def train_on_fixed_grads(model, opt, steps: int = STEPS) -> None:
    """Gradients drawn from a seeded generator, the same whole tensors in every process (a
    DTensor parameter gets its shard): the optimizer's own arithmetic, nothing of the ranks' sums."""
    from torch.distributed.tensor import distribute_tensor

    for step in range(steps):
        for i, p in enumerate(model.parameters()):
            g = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i), dtype=p.dtype)
            p.grad = distribute_tensor(g, p.device_mesh, p.placements) if hasattr(p, "device_mesh") else g
        opt.step()


def whole(x: torch.Tensor) -> torch.Tensor:
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def flat(params) -> torch.Tensor:
    return torch.cat([whole(p).detach().reshape(-1) for p in params]).clone()


def decoded_state(opt) -> dict:
    """Every state tensor, decoded and whole (the optimizer is left in full precision)."""
    from optforge.lowbit import LowBitState

    low_bit = sum(isinstance(x, LowBitState) for st in opt.state.values() for x in st.values())
    opt.configure(state_precision=None)
    return {"low_bit_entries": low_bit,
            "state": [{k: whole(v).clone() for k, v in st.items()} for st in opt.state.values()]}


def fsdp(kind: str) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = make(kind)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def _save_dcp(model, opt, path: str) -> None:
    from torch.distributed.checkpoint import save
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)


def _load_dcp(model, opt, path: str) -> None:
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    loaded = {"model": model_sd, "optim": optim_sd}
    load(loaded, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])


def run_low_bit(results: dict, case, rank: int, directory: str) -> None:
    """The 2-rank cases; ``case(results, key, fn, *args)`` runs one, keeping a traceback."""
    from conformance_cases import INFOS

    from optforge.lowbit import PRECISIONS

    def fsdp_fixed_grads(precision, fused):
        model = fsdp("aligned")
        opt = optimizer("aligned", model.parameters(), precision, fused=fused)
        train_on_fixed_grads(model, opt)
        return {"params": flat(model.parameters()), **decoded_state(opt)}

    def fsdp_trained(kind, name, precision, fused):
        model = fsdp(kind)
        opt = optimizer(kind, model.parameters(), precision, name, fused)
        train(model, opt, *data(kind, rank), STEPS)
        return {"params": flat(model.parameters()), **decoded_state(opt)}

    def ddp(precision):
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(make("uneven"))
        train(model, optimizer("uneven", model.parameters(), precision), *data("uneven", rank), STEPS)
        params = flat(model.module.parameters())
        replicas = [torch.empty_like(params) for _ in range(2)]
        dist.all_gather(replicas, params)
        return {"params": params, "replicas_equal": all(torch.equal(r, params) for r in replicas)}

    def resumed_at_same_ranks(precision, fused, via):
        """3 steps, a checkpoint (per-rank torch.save of the state dicts, or DCP), 2 steps;
        the checkpoint loaded into a fresh model and optimizer, 2 steps."""
        model = fsdp("uneven")
        opt = optimizer("uneven", model.parameters(), precision, fused=fused)
        x, y = data("uneven", rank)
        train(model, opt, x, y, SAVED_AT)
        path = os.path.join(directory, f"low_bit-{precision}-{fused}")
        if via == "dcp":
            _save_dcp(model, opt, path)
        else:
            weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            saved = io.BytesIO()
            torch.save(opt.state_dict(), saved)
        train(model, opt, x, y, STEPS - SAVED_AT)
        twin = fsdp("uneven")
        twin_opt = optimizer("uneven", twin.parameters(), precision, fused=fused)
        if via == "dcp":
            _load_dcp(twin, twin_opt, path)
        else:
            twin.load_state_dict(weights)
            saved.seek(0)
            twin_opt.load_state_dict(torch.load(saved, weights_only=False))
        train(twin, twin_opt, x, y, STEPS - SAVED_AT)
        return {"same_params": torch.equal(flat(model.parameters()), flat(twin.parameters())),
                "same_state": _same(decoded_state(opt)["state"], decoded_state(twin_opt)["state"])}

    def saved_for_other_ranks(precision):
        """Checkpoints for ``resume_low_bit``: the low-bit state, and the same run's state in
        full precision (``configure(state_precision=None)`` before saving)."""
        for full in (False, True):
            model = fsdp("uneven")
            opt = optimizer("uneven", model.parameters(), precision)
            train(model, opt, *data("uneven", rank), SAVED_AT)
            if full:
                opt.configure(state_precision=None)
            _save_dcp(model, opt, os.path.join(directory, f"low_bit-{precision}{'-full' if full else ''}"))
        return {"saved": True}

    def one_process_state_into_shards():
        """One process's int8 state dict (plain codes of whole tensors) loaded by the 2 ranks:
        decoded, and each shard encoded again (its blocks are the whole tensor's here)."""
        single = make("aligned")
        single_opt = optimizer("aligned", single.parameters(), "int8")
        train(single, single_opt, *data("aligned"), SAVED_AT)
        model = fsdp("aligned")
        opt = optimizer("aligned", model.parameters(), "int8")
        opt.load_state_dict(single_opt.state_dict())
        return {**decoded_state(opt), "one_process": decoded_state(single_opt)["state"]}

    def refused_other_sharding(via_configure):
        """A parameter sharded on dim 1 (as tensor parallelism shards some): its shard is no run of rows."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        import optforge as of

        mesh = init_device_mesh("cpu", (2,))
        p = nn.Parameter(distribute_tensor(torch.ones(4, 6, dtype=torch.float64), mesh, [Shard(1)]))
        p.grad = distribute_tensor(torch.ones(4, 6, dtype=torch.float64), mesh, [Shard(1)])
        try:
            if via_configure:
                of.AdamW([p]).configure(state_precision="int8")
            else:
                of.AdamW([{"params": [p], "state_precision": "int8"}]).step()
        except ValueError as err:
            return {"error": str(err), "unchanged": bool((whole(p) == 1).all())}
        return {"error": None}

    for precision in PRECISIONS:
        for fused in (False, True) if precision in FUSED else (False,):
            case(results, ("low_bit_fixed_grads", precision, fused), fsdp_fixed_grads, precision, fused)
        case(results, ("low_bit_uneven", precision, False), fsdp_trained, "uneven", "adamw", precision, False)
        case(results, ("low_bit_ddp", precision), ddp, precision)
    case(results, ("low_bit_uneven", "int4", True), fsdp_trained, "uneven", "adamw", "int4", True)
    for info in INFOS:
        if info.elementwise and info.cls.has_kernel():
            case(results, ("low_bit_every", info.name), fsdp_trained, "aligned", info.name, "int8", False)
    for resumed in RESUMED:
        case(results, ("low_bit_resumed", *resumed), resumed_at_same_ranks, *resumed)
    case(results, ("low_bit_saved",), saved_for_other_ranks, "int8")
    case(results, ("low_bit_from_one_process",), one_process_state_into_shards)
    for via_configure in (False, True):
        case(results, ("low_bit_refused", via_configure), refused_other_sharding, via_configure)


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def resume_low_bit(results: dict, run, rank: int, world: int, directory: str) -> None:
    """The checkpoints of 2 ranks loaded by ``world`` ranks: the low-bit one refused; the
    full-precision one loaded, then encoded (``configure``) at this sharding, 2 more steps."""
    def low_bit_checkpoint():
        model = fsdp("uneven")
        opt = optimizer("uneven", model.parameters(), "int8")
        before = flat(model.parameters())
        try:
            _load_dcp(model, opt, os.path.join(directory, "low_bit-int8"))
        except ValueError as err:
            return {"error": str(err), "unchanged": torch.equal(flat(model.parameters()), before)}
        return {"error": None}

    def full_precision_checkpoint():
        model = fsdp("uneven")
        opt = optimizer("uneven", model.parameters(), None)
        _load_dcp(model, opt, os.path.join(directory, "low_bit-int8-full"))
        opt.configure(state_precision="int8")
        train(model, opt, *data("uneven", rank, world), STEPS - SAVED_AT)
        return {"params": flat(model.parameters()), **decoded_state(opt)}

    def hsdp():
        """HSDP on a 2 x 2 mesh: replicated over "replicate", sharded over "shard" (2 ranks a
        replica, so the shards are the 2-rank FSDP2 ones: whole blocks)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        model = make("aligned")
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = optimizer("aligned", model.parameters(), "int4")
        train(model, opt, *data("aligned", rank, world), STEPS)
        placements = repr(next(model.parameters()).placements)
        return {"params": flat(model.parameters()), "placements": placements, **decoded_state(opt)}

    run(("low_bit_resumed", "refused"), low_bit_checkpoint)
    run(("low_bit_resumed", "full"), full_precision_checkpoint)
    if world == 4:
        run(("low_bit_hsdp",), hsdp)
