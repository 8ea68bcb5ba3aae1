"""The ranks spawned by test_distributed_matrix.py (once): a process group of 4 ranks runs every
case, then ranks 0 and 1 form a process group of 2 and run them again; rank 0 saves what the
parent test compares with one process."""

from __future__ import annotations

import os
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

STEPS = 6
ROWS = 8                     # the full batch: each data-parallel rank trains on ROWS / dp rows


def make_model() -> nn.Module:
    """Float64 matrices sharded unevenly on 2 and 4 ranks, some with an empty shard (the (5, 8),
    (3, 5) and (1, 3) weights), five (8, 8) ones (on 2 and on 4 ranks, an owner gets several:
    one batched call)."""
    torch.manual_seed(0)
    square = [m for _ in range(5) for m in (nn.Linear(8, 8), nn.Tanh())]
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), *square, nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3),
                         nn.Tanh(), nn.Linear(3, 1)).double()


def make_tp_model() -> nn.Module:
    """For a 2 x 2 mesh: layer 0 column-parallel, layer 2 row-parallel, then FSDP2 on both."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 7), nn.Tanh(), nn.Linear(7, 1)).double()


def data(part: int = 0, parts: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(ROWS, 6, generator=g, dtype=torch.float64)
    y = torch.randn(ROWS, 1, generator=g, dtype=torch.float64)
    rows = slice(part * ROWS // parts, (part + 1) * ROWS // parts)
    return x[rows], y[rows]


def make_optimizer(case: str, params):
    import optforge as of

    if case == "normuon":
        return of.NorMuon(params, lr=0.02, weight_decay=0.01, ns_dtype="param")
    if case.startswith("muon"):
        extra = dict(nesterov=False, adjust_lr_fn="match_rms_adamw") if case == "muon_variants" else {}
        return of.Muon(params, lr=0.02, weight_decay=0.01, ns_dtype="param", **extra)
    if case == "galore_adamw":   # rank-2 bases, renewed every other step; vectors get AdamW
        return of.GaLoreAdamW(params, lr=1e-2, rank=2, update_proj_gap=2, weight_decay=0.01)
    if case == "psgd_kron":      # momentum: owner-held too; the (8, 5) and (5, 3) ones get dense factors
        return of.PSGDKron(params, lr=1e-2, momentum=0.9, weight_decay=0.01)
    if case == "shampoo":        # blocks of at most 6: the (8, 8) weights are cut in four
        # float64 factors and an epsilon that keeps the inverse roots well conditioned: one process
        # batches the blocks of all tensors, an owner those of its own, which rounds differently
        return of.Shampoo(params, lr=1e-2, weight_decay=0.01, precondition_frequency=2,
                          max_preconditioner_dim=6, factor_matrix_dtype="float64", epsilon=1e-6)
    extra = (dict(normalize_grads=True, precondition_1d=True, max_precond_dim=6, weight_decay_mode="coupled",
                  maximize=True) if case == "soap_variants" else {})
    return of.SOAP(params, lr=1e-2, precondition_frequency=2, **extra)


CASES = ("muon", "muon_variants", "muon_rounds", "normuon", "soap", "soap_variants", "shampoo", "psgd_kron",
         "galore_adamw")
# saved by DCP on 4 ranks, resumed on 2
RESUMED = ("muon", "soap", "shampoo", "psgd_kron", "galore_adamw")
FULL_BATCH = ("muon", "muon_variants", "muon_rounds", "normuon", "shampoo", "psgd_kron", "galore_adamw")


def train(model, opt, x, y, steps=STEPS) -> list[torch.Tensor]:
    """The training steps; returns each step's whole gradients (flat)."""
    grads = []
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        grads.append(flat(p.grad for p in model.parameters()))
        opt.step()
    return grads


def replay(case: str, grads: list[torch.Tensor], tp: bool = False) -> torch.Tensor:
    """One process, stepping on the given whole gradients."""
    model = make_tp_model() if tp else make_model()
    opt = make_optimizer(case, model.parameters())
    for g in grads:
        at = 0
        for p in model.parameters():
            p.grad = g[at:at + p.numel()].view_as(p).clone()
            at += p.numel()
        opt.step()
    return flat(model.parameters())


def flat(params) -> torch.Tensor:
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in params]
    return torch.cat([p.detach().reshape(-1) for p in full]).clone()


def reference(case: str, tp: bool = False, steps: int = STEPS) -> torch.Tensor:
    """One process, the full batch."""
    model = make_tp_model() if tp else make_model()
    train(model, make_optimizer(case, model.parameters()), *data(), steps=steps)
    return flat(model.parameters())


def state_numel(opt) -> int:
    """Elements of the optimizer state this process holds (local shards of DTensors)."""
    total = 0
    for st in opt.state.values():
        for name, v in st.items():
            if name != "step" and torch.is_tensor(v):
                total += (v.to_local() if hasattr(v, "to_local") else v).numel()
    return total


def _case(results: dict, key: tuple, fn, *args) -> None:
    try:
        results[key] = fn(*args)
    except Exception:
        results[key] = "error: " + traceback.format_exc()


def fsdp_model(mesh=None) -> nn.Module:
    """FSDP2 on every Linear and the whole; on a 2-D ``mesh``: HSDP (replicated over dim 0)."""
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def checkpointed(case: str, rank: int, world: int, path: str) -> dict:
    """4 ranks: 3 steps, then a DCP checkpoint. 2 ranks: a fresh model and optimizer load it
    (each matrix has another owner now) and take 3 more steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = fsdp_model()
    opt = make_optimizer(case, model.parameters())
    if world == 4:
        grads = train(model, opt, *data(rank, world), steps=3)
        model_sd, opt_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": opt_sd}, checkpoint_id=path)
        return {"grads": grads}
    model_sd, opt_sd = get_state_dict(model, opt)
    both = {"model": model_sd, "optim": opt_sd}
    dcp.load(both, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=both["model"], optim_state_dict=both["optim"])
    grads = train(model, opt, *data(rank, world), steps=3)
    return {"grads": grads, "params": flat(model.parameters())}


def run_rank(rank: int, ports: tuple[int, int], out: str) -> None:
    torch.set_num_threads(1)
    results = {}
    for world, port in zip((4, 2), ports):
        if rank < world:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
            results[world] = run_cases(rank, world)
            for case in RESUMED:
                _case(results[world], ("dcp", case), checkpointed, case, rank, world, f"{out}.{case}")
            dist.barrier()
            dist.destroy_process_group()
    if rank == 0:
        torch.save(results, out)


def _refusal(opt, p) -> dict:
    """Step ``opt``: the ValueError it raises, and whether ``p`` and the state were left as they were."""
    before = p.to_local().clone()
    try:
        opt.step()
    except ValueError as err:
        return {"error": str(err), "unchanged": torch.equal(p.to_local(), before) and not opt.state}
    return {"error": None}


def run_cases(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Partial

    import optforge as of
    from optforge import distributed_matrix

    results: dict = {}

    def fsdp(case, hsdp=False):
        model = fsdp_model(init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
                           if hsdp else None)
        opt = make_optimizer(case, model.parameters())
        if case == "muon_rounds":         # one small matrix per owner and round: many rounds in flight
            distributed_matrix.ROUND_NUMEL = 1
        try:
            grads = train(model, opt, *data(rank, world))
        finally:
            distributed_matrix.ROUND_NUMEL = 1 << 24
        per_rank = [None] * world
        dist.all_gather_object(per_rank, state_numel(opt))
        muon_state = [v for st in opt.state.values() for k, v in st.items()      # (Kron's: owner-held)
                      if k == "momentum_buffer" and "muon" in case]
        return {"params": flat(model.parameters()), "grads": grads, "state_per_rank": per_rank,
                "muon_state_sharded": all(isinstance(v, DTensor) for v in muon_state)}

    for case in CASES:
        _case(results, ("fsdp", case), fsdp, case)
    for case in ("muon", "soap"):
        _case(results, ("hsdp", case), fsdp, case, True)

    def fsdp_tp(case):
        """FSDP2 x tensor parallel on a 2 x 2 mesh: every matrix is sharded over both mesh dims."""
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        model = make_tp_model()
        parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        fully_shard(model, mesh=mesh["dp"])
        placements = [tuple(p.placements) for p in model.parameters()]
        opt = make_optimizer(case, model.parameters())
        grads = train(model, opt, *data(mesh.get_coordinate()[0], 2))
        return {"params": flat(model.parameters()), "grads": grads, "placements": placements}

    if world == 4:
        for case in ("muon", "soap"):
            _case(results, ("tp", case), fsdp_tp, case)

    def refused(name):
        """A parameter whose placements hold partial sums: no whole matrix can be assembled."""
        mesh = init_device_mesh("cpu", (world,))
        p = nn.Parameter(DTensor.from_local(torch.ones(3, 4, dtype=torch.float64), mesh, [Partial()]))
        p.grad = DTensor.from_local(torch.ones(3, 4, dtype=torch.float64), mesh, [Partial()])
        opt = of.get_optimizer_info(name).cls([p], lr=0.1)
        return _refusal(opt, p)

    for name in ("muon", "soap"):
        _case(results, ("refuse", name), refused, name)

    def refused_low_precision():
        """bf16 params updated through float32 copies: the owner's state would be keyed by copies."""
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        p = nn.Parameter(distribute_tensor(torch.ones(4, 3, dtype=torch.bfloat16), mesh, [Shard(0)]))
        p.grad = distribute_tensor(torch.ones(4, 3, dtype=torch.bfloat16), mesh, [Shard(0)])
        opt = of.Muon([p], lr=0.1).configure(fp32_state=True)
        return _refusal(opt, p)

    _case(results, ("refuse", "low_precision"), refused_low_precision)

    return results
