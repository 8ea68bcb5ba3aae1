"""Distributed checkpoints (torch.distributed.checkpoint) and tensor parallelism, for
test_distributed.py: 2 FSDP2 ranks train ``SAVED_AT`` steps and save (``save``, run by
distributed_worker's group); a group of 1 rank and one of 4 load the checkpoint into fresh
models and optimizers (resharding it) and train the remaining steps (``run_group``), which must
give the parameters of one process that never stopped. The 4-rank group also trains on a 2 x 2
(data parallel x tensor parallel) mesh (distributed_tensor_parallel)."""

from __future__ import annotations

import os
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
from distributed_worker import (
    LBFGS_CASES,
    STEPS,
    _fsdp,
    data,
    flat,
    make_model,
    make_wrapped,
    train,
    train_lbfgs,
    train_wrapped,
)

SAVED_AT = 3                          # steps before the checkpoint; STEPS - SAVED_AT after it
WRAPPED_KINDS = ("lookahead", "sam")
# L-BFGS with a fixed step and with the strong-Wolfe line search
LBFGS_KINDS = {"lbfgs": LBFGS_CASES["fixed"], "lbfgs_strong_wolfe": LBFGS_CASES["strong_wolfe"]}

Case = tuple[str, dict, bool]         # (optimizer name or wrapper kind, kwargs, fused)


def build(case: Case, params):
    import optforge as of

    name, kwargs, fused = case
    if name in WRAPPED_KINDS:
        return make_wrapped(name, params)
    if name in LBFGS_KINDS:
        return of.LBFGS(params, **kwargs)
    return of.get_optimizer_info(name).cls(params, **kwargs, **({"fused": True} if fused else {}))


def advance(case: Case, model, opt, x, y, steps: int) -> None:
    if case[0] in WRAPPED_KINDS:
        train_wrapped(case[0], model, x, y, opt=opt, steps=steps)
    elif case[0] in LBFGS_KINDS:
        train_lbfgs(model, opt, x, y, loss_over_ranks=dist.is_initialized(), steps=steps)
    else:
        train(model, opt, x, y, steps=steps)


def one_process(case: Case, steps: int) -> torch.Tensor:
    """The parameters after ``steps`` steps of one process on the full batch, never stopped."""
    model = make_model()
    advance(case, model, build(case, model.parameters()), *data(), steps)
    return flat(model.parameters())


def stateful(opt):
    """What get_state_dict takes: SAM has no state of its own (its step needs a closure, which
    get_state_dict's state-creating step of a fresh optimizer does not pass): its base's."""
    import optforge as of

    return opt.base_optimizer if isinstance(opt, of.SAM) else opt


def label(case: Case) -> str:
    return f"{case[0]}{'-fused' if case[2] else ''}"


def save(case: Case, rank: int, directory: str) -> dict:
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = _fsdp(make_model())
    opt = build(case, model.parameters())
    advance(case, model, opt, *data(rank), SAVED_AT)
    model_sd, optim_sd = get_state_dict(model, stateful(opt))
    dcp_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(directory, label(case)))
    return {"saved": True}


def resume(case: Case, rank: int, world: int, directory: str) -> dict:
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = _fsdp(make_model())
    opt = build(case, model.parameters())
    model_sd, optim_sd = get_state_dict(model, stateful(opt))
    loaded = {"model": model_sd, "optim": optim_sd}
    dcp_load(loaded, checkpoint_id=os.path.join(directory, label(case)))
    set_state_dict(model, stateful(opt), model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    advance(case, model, opt, *data(rank, world), STEPS - SAVED_AT)
    return {"params": flat(model.parameters())}


def partial_placement(rank: int) -> dict:
    """A DTensor parameter with unreduced (Partial) placements: a clear ValueError, nothing changed."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial

    import optforge as of

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    p = torch.nn.Parameter(DTensor.from_local(torch.ones(3, dtype=torch.float64), mesh, [Partial()]))
    p.grad = DTensor.from_local(torch.ones(3, dtype=torch.float64), mesh, [Partial()])
    before = p.to_local().clone()
    try:
        of.LAMB([p]).step()
    except ValueError as err:
        return {"error": str(err), "unchanged": torch.equal(p.to_local(), before)}
    return {"error": None}


def _snapshot(opt) -> list:
    """The optimizer's state, flattened, with local copies of its tensors."""
    def leaves(x):
        if isinstance(x, dict):
            return [leaf for k, v in x.items() for leaf in (k, *leaves(v))]
        if isinstance(x, list):
            return [leaf for v in x for leaf in leaves(v)]
        return [x.to_local().clone() if hasattr(x, "to_local") else x.clone() if torch.is_tensor(x) else x]
    return [leaf for p in opt.param_groups[0]["params"] for leaf in leaves(opt.state[p])]


def _refused(model, opt, x, y) -> dict:
    before, state = flat(model.parameters()), _snapshot(opt)
    try:
        train_lbfgs(model, opt, x, y, loss_over_ranks=True, steps=1)
    except ValueError as err:
        after = _snapshot(opt)
        same = len(after) == len(state) and all(
            torch.equal(a, b) if torch.is_tensor(a) else a == b for a, b in zip(after, state))
        return {"error": str(err), "unchanged": torch.equal(flat(model.parameters()), before) and same}
    return {"error": None}


def lbfgs_layouts() -> dict:
    """L-BFGS keeps flat vectors for plain parameters (torch's layout) and per-parameter ones for
    DTensor parameters: each refuses the other's state, clearly, before any change."""
    import optforge as of

    x, y = data()
    plain = make_model()
    flat_state = torch.optim.LBFGS(plain.parameters(), **LBFGS_KINDS["lbfgs"])     # torch's own
    train_lbfgs(plain, flat_state, x, y)
    model = _fsdp(make_model())
    sharded = of.LBFGS(model.parameters(), **LBFGS_KINDS["lbfgs"])
    sharded.load_state_dict(flat_state.state_dict())
    results = {"flat_into_sharded": _refused(model, sharded, x, y)}

    per_parameter = of.LBFGS(model.parameters(), **LBFGS_KINDS["lbfgs"])
    train_lbfgs(model, per_parameter, x, y)
    saved = per_parameter.state_dict()              # as full tensors (what a full state dict holds)

    def whole(x):
        if isinstance(x, list):
            return [whole(v) for v in x]
        return x.full_tensor() if hasattr(x, "full_tensor") else x

    full = {"state": {k: {n: whole(x) for n, x in st.items()} for k, st in saved["state"].items()},
            "param_groups": saved["param_groups"]}
    plain = make_model()
    opt = of.LBFGS(plain.parameters(), **LBFGS_KINDS["lbfgs"])
    opt.load_state_dict(full)
    results["sharded_into_flat"] = _refused(plain, opt, x, y)
    return results


def run_group(rank: int, world: int, port: int, out: str, directory: str, cases: list[Case],
              tp_cases: list[str]) -> None:
    """One process group of ``world`` ranks: every checkpoint of ``cases`` resumed; with 4
    ranks, ``tp_cases`` (distributed_tensor_parallel's labels) on the 2 x 2 mesh too. Rank 0
    saves the results."""
    from distributed_tensor_parallel import layouts, refusals, tensor_parallel
    from torch.distributed.checkpoint.api import CheckpointException

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    results: dict = {}

    def run(key, fn, *args):
        try:
            results[key] = fn(*args)
        except (Exception, CheckpointException):     # CheckpointException is a BaseException
            results[key] = "error: " + traceback.format_exc()

    for case in cases:
        run(("resumed", label(case)), resume, case, rank, world, directory)
    if world == 1:
        run(("lbfgs_layouts",), lbfgs_layouts)
    from distributed_lowbit import resume_low_bit

    resume_low_bit(results, run, rank, world, directory)
    if world == 4:
        for case in tp_cases:
            run(("tp", case), tensor_parallel, case, rank)
        run(("partial",), partial_placement, rank)
        run(("layouts",), layouts, rank)
        run(("refusals",), refusals, rank)
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()
