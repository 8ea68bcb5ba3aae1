"""The ranks spawned by test_distributed.py (one spawn for the whole module): every case runs in
both ranks, and rank 0 saves what the parent test compares."""

from __future__ import annotations

import math
import os
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

WORLD = 2
STEPS = 5
ROWS = 8                     # the full batch; rank r trains on rows [4r, 4r + 4)
MARS_Y_SCALE = 30.0
SCALAR_STATE = {"step", "mu_product", "eta", "mu"}   # 0-d state, not param-shaped (as tests/helpers.py)


def make_model() -> nn.Module:
    """Float64; the last layer's (1, 5) weight and (1,) bias shard to nothing on rank 1."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 1)).double()


def data(rank: int | None = None, world: int = WORLD) -> tuple[torch.Tensor, torch.Tensor]:
    """The full batch, or data-parallel rank ``rank``'s equal share of it."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(ROWS, 6, generator=g, dtype=torch.float64)
    y = torch.randn(ROWS, 1, generator=g, dtype=torch.float64)
    if rank is None:
        return x, y
    rows = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
    return x[rows], y[rows]


def train(model, opt, x, y, steps=STEPS, poison=None) -> None:
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        if poison is not None:
            poison(model)
        opt.step()


def flat(params) -> torch.Tensor:
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in params]
    return torch.cat([p.detach().reshape(-1) for p in full]).clone()


def reference(name: str, kwargs: dict, y_scale: float = 1.0) -> torch.Tensor:
    """One process, the full batch (its targets times ``y_scale``)."""
    import optforge as of

    model = make_model()
    x, y = data()
    train(model, of.get_optimizer_info(name).cls(model.parameters(), **kwargs), x, y * y_scale)
    return flat(model.parameters())


def adam_mini_blocks(params) -> list[dict]:
    """Adam-mini's blocks as param groups: heads of 16 entries of the (8, 6) weight (the second
    spans the shards: rows 0-3 and 4-7 of FSDP2 on 2 ranks), rows of the (5, 8) and (1, 5)
    weights (rank 1 holds no row of the latter), one block per bias, and entries of the last."""
    w0, b0, w1, b1, w2, b2 = params
    return [{"params": [w0], "partition": "head", "dim": 8, "n_heads": 4},
            {"params": [w1, w2], "partition": "row"},
            {"params": [b0, b1], "partition": "tensor"},
            {"params": [b2], "partition": "element"}]


ADAM_MINI_BLOCKS = {"lr": 1e-2, "betas": (0.9, 0.99)}
LBFGS_CASES = {"fixed": dict(lr=0.5, max_iter=4, history_size=3),
               "strong_wolfe": dict(lr=1, max_iter=4, history_size=3, line_search_fn="strong_wolfe")}
LBFGS_STEPS = 3
LBFGS_VECTORS = ("d", "prev_flat_grad")       # L-BFGS's vectors, per parameter under FSDP2
LBFGS_HISTORY = ("old_dirs", "old_stps")     # history_size of them per parameter


def adam_mini_blocks_reference() -> torch.Tensor:
    import optforge as of

    model = make_model()
    train(model, of.AdamMini(adam_mini_blocks(list(model.parameters())), **ADAM_MINI_BLOCKS), *data())
    return flat(model.parameters())


def train_lbfgs(model, opt, x, y, loss_over_ranks=False, steps=LBFGS_STEPS) -> None:
    """L-BFGS steps; ``loss_over_ranks``: each rank's loss averaged over the ranks, the loss of
    the whole batch that the closure must return on every rank."""
    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        if loss_over_ranks:
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        return loss

    for _ in range(steps):
        opt.step(closure)


def lbfgs_reference(case: str, steps: int = LBFGS_STEPS) -> torch.Tensor:
    import optforge as of

    model = make_model()
    train_lbfgs(model, of.LBFGS(model.parameters(), **LBFGS_CASES[case]), *data(), steps=steps)
    return flat(model.parameters())


def make_embedding() -> nn.Module:
    torch.manual_seed(0)
    return nn.Embedding(25, 4, sparse=True, dtype=torch.float64)


def train_sparse(model: nn.Module, opt, rank: int | None = None, steps: int = STEPS) -> None:
    """Batches of ROWS indices that repeat rows and leave rows 15.. out; data-parallel rank
    ``rank`` takes its equal share of each."""
    g = torch.Generator().manual_seed(1)
    target = torch.randn(25, 4, generator=g, dtype=torch.float64)
    for _ in range(steps):
        idx = torch.randint(0, 15, (ROWS,), generator=g)
        if rank is not None:
            idx = idx[rank * ROWS // WORLD:(rank + 1) * ROWS // WORLD]
        opt.zero_grad()
        ((model(idx) - target[idx]) ** 2).mean().backward()
        opt.step()


def sparse_adam_reference() -> torch.Tensor:
    import optforge as of

    model = make_embedding()
    train_sparse(model, of.SparseAdam(model.parameters(), lr=0.05))
    return flat(model.parameters())


WRAPPED = ("lookahead", "sam", "asam")


def make_wrapped(kind: str, params):
    """AdamW in Lookahead, SAM or ASAM."""
    import optforge as of

    base = of.AdamW(params, lr=1e-2)
    return (of.Lookahead(base, k=2, alpha=0.5) if kind == "lookahead"
            else of.SAM(base, rho=0.5, adaptive=True) if kind == "asam" else of.SAM(base, rho=0.05))


def train_wrapped(kind: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt=None, steps=STEPS):
    """Lookahead, SAM or ASAM steps (the closure's gradient at the perturbed weights)."""
    opt = opt or make_wrapped(kind, model.parameters())

    def closure():
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    for _ in range(steps):
        opt.zero_grad()
        closure()
        opt.step() if kind == "lookahead" else opt.step(closure)
    return opt


def wrapped_reference(kind: str) -> torch.Tensor:
    model = make_model()
    train_wrapped(kind, model, *data())
    return flat(model.parameters())


def _fsdp(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def _case(results: dict, key: tuple, fn, *args) -> None:
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        results[key] = fn(*args)
    except (Exception, CheckpointException):         # CheckpointException is a BaseException
        results[key] = "error: " + traceback.format_exc()


def run_rank(rank: int, port: int, out: str, cases: list[tuple[str, dict, bool, bool]], directory: str,
             saves: list) -> None:
    """``cases``: (optimizer name, kwargs, whether it has a fused path, whether it takes DTensors);
    ``saves``: the checkpoints to write into ``directory`` (distributed_checkpoint.save)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel as DDP

    import optforge as of

    x, y = data(rank)
    results: dict = {}

    def ddp(name, kwargs, fused):
        model = DDP(make_model())
        opt = of.get_optimizer_info(name).cls(model.parameters(), **kwargs, fused=fused)
        train(model, opt, x, y)
        params = flat(model.module.parameters())
        replicas = [torch.empty_like(params) for _ in range(WORLD)]
        dist.all_gather(replicas, params)
        return {"params": params, "replicas_equal": all(torch.equal(r, params) for r in replicas)}

    def fsdp(name, kwargs, fused, y_scale=1.0):
        model = _fsdp(make_model())
        fused_kwargs = {"fused": True} if fused else {}
        opt = of.get_optimizer_info(name).cls(model.parameters(), **kwargs, **fused_kwargs)
        train(model, opt, x, y * y_scale)
        state = [v for st in opt.state.values() for k, v in st.items() if k not in SCALAR_STATE]
        sharded = bool(state) and all(isinstance(v, DTensor) for v in state)
        first = opt.state[next(model.parameters())]             # the (8, 6) weight's
        placements = {k: tuple(map(repr, v.placements)) for k, v in first.items() if isinstance(v, DTensor)}
        return {"params": flat(model.parameters()), "state_sharded": sharded, "placements": placements}

    def fsdp_adam_mini_blocks():
        model = _fsdp(make_model())
        opt = of.AdamMini(adam_mini_blocks(list(model.parameters())), **ADAM_MINI_BLOCKS)
        train(model, opt, x, y)
        state = {k: (type(v).__name__, tuple(map(repr, v.placements)) if isinstance(v, DTensor) else None)
                 for k, v in opt.state[next(model.parameters())].items()}
        return {"params": flat(model.parameters()), "state": state}

    def fsdp_lbfgs(case):
        model = _fsdp(make_model())
        opt = of.LBFGS(model.parameters(), **LBFGS_CASES[case])
        train_lbfgs(model, opt, x, y, loss_over_ranks=True)
        vectors = [(p, v) for p in model.parameters() for k, v in opt.state[p].items() if k in LBFGS_VECTORS]
        vectors += [(p, v) for p in model.parameters() for k in LBFGS_HISTORY for v in opt.state[p][k]]
        return {"params": flat(model.parameters()), "pairs": len(opt.state[next(model.parameters())]["ro"]),
                "state_sharded": len(vectors) == 6 * (2 + 2 * LBFGS_CASES[case]["history_size"]) and all(
                    isinstance(v, DTensor) and v.placements == p.placements and v.shape == p.shape
                    for p, v in vectors)}

    def fsdp_lbfgs_torch_save(case, saved_at, steps):
        """A per-rank torch.save of the state dict, loaded by a new optimizer (the state's tensors
        are new objects: taken into new flat vectors), which takes the remaining steps."""
        import io

        model = _fsdp(make_model())
        opt = of.LBFGS(model.parameters(), **LBFGS_CASES[case])
        train_lbfgs(model, opt, x, y, loss_over_ranks=True, steps=saved_at)
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        buffer.seek(0)
        opt = of.LBFGS(model.parameters(), **LBFGS_CASES[case])
        opt.load_state_dict(torch.load(buffer, weights_only=False))
        train_lbfgs(model, opt, x, y, loss_over_ranks=True, steps=steps - saved_at)
        return {"params": flat(model.parameters())}

    _case(results, ("fsdp_lbfgs_torch_save", "strong_wolfe"), fsdp_lbfgs_torch_save, "strong_wolfe", 2, 5)
    _case(results, ("fsdp_blocks", "adam_mini"), fsdp_adam_mini_blocks)
    for case in LBFGS_CASES:
        _case(results, ("fsdp_lbfgs", case), fsdp_lbfgs, case)

    from distributed_lowbit import run_low_bit

    run_low_bit(results, _case, rank, directory)

    def ddp_lbfgs(case):
        """Every rank's closure returns the loss of the whole batch (its own, averaged over the ranks)."""
        model = DDP(make_model())
        train_lbfgs(model, of.LBFGS(model.parameters(), **LBFGS_CASES[case]), x, y, loss_over_ranks=True)
        return {"params": flat(model.module.parameters())}

    def ddp_sparse_adam():
        """nn.Embedding(sparse=True): gloo all-reduces DDP's sparse gradients (sums of the
        ranks' rows, coalesced), which SparseAdam steps on."""
        model = DDP(make_embedding())
        opt = of.SparseAdam(model.parameters(), lr=0.05)
        train_sparse(model, opt, rank)
        params = flat(model.module.parameters())
        replicas = [torch.empty_like(params) for _ in range(WORLD)]
        dist.all_gather(replicas, params)
        grad = model.module.weight.grad                       # the last step's, all-reduced
        return {"params": params, "replicas_equal": all(torch.equal(r, params) for r in replicas),
                "grad_sparse": grad.is_sparse}

    for case in LBFGS_CASES:
        _case(results, ("ddp_lbfgs", case), ddp_lbfgs, case)
    _case(results, ("ddp", "sparse_adam"), ddp_sparse_adam)
    for name, kwargs, has_fused, on_dtensors in cases:
        for fused in (False, True) if has_fused else (False,):
            _case(results, ("ddp", name, fused), ddp, name, kwargs, fused)
            if on_dtensors:
                _case(results, ("fsdp", name, fused), fsdp, name, kwargs, fused)

    # gradients large enough for MARS's clip c / max(1, ||c||) to act (the usual targets leave
    # every ||c|| below 1, where a shard's norm would pass unnoticed)
    _case(results, ("fsdp_large_grads", "mars"), fsdp, "mars", {"lr": 1e-2}, False, MARS_Y_SCALE)

    def fsdp_wrapped(kind):
        model = _fsdp(make_model())
        opt = train_wrapped(kind, model, x, y)
        slow = list(getattr(opt, "slow_weights", {}).values())
        return {"params": flat(model.parameters()), "slow_sharded": all(isinstance(v, DTensor) for v in slow)}

    def ddp_wrapped(kind):
        model = DDP(make_model())
        train_wrapped(kind, model, x, y)
        return {"params": flat(model.module.parameters())}

    for kind in WRAPPED:
        _case(results, ("wrapped", kind), fsdp_wrapped, kind)
        _case(results, ("wrapped_ddp", kind), ddp_wrapped, kind)

    def misaligned_slow_weights():
        """Slow weights that are not sharded as their parameter (e.g. set from a full tensor)."""
        model = _fsdp(make_model())
        opt = of.Lookahead(of.AdamW(model.parameters(), lr=1e-2), k=2)
        train(model, opt, x, y, steps=1)
        p = next(model.parameters())
        opt.slow_weights[p] = opt.slow_weights[p].full_tensor()
        try:
            train(model, opt, x, y, steps=1)
        except ValueError as err:
            return {"error": str(err)}
        return {"error": None}

    _case(results, ("wrapped", "misaligned"), misaligned_slow_weights)

    def refused(make_opt):
        model = _fsdp(make_model())
        opt = make_opt(model.parameters())
        before = flat(model.parameters())
        try:
            train(model, opt, x, y, steps=1)
        except ValueError as err:
            return {"error": str(err), "unchanged": torch.equal(flat(model.parameters()), before)}
        return {"error": None}

    _case(results, ("refuse", "sparse_adam"), lambda: refused(lambda ps: of.SparseAdam(ps, lr=0.1)))

    class NormSGD(of.SGD):    # stands for an optimizer that needs whole-tensor norms
        pass

    of.register(NormSGD, "test stand-in", name="norm_sgd_test", elementwise=False)

    class NormSGDChild(NormSGD):   # unregistered: inherits its registered base's flag
        pass

    _case(results, ("refuse", "not_elementwise"), lambda: refused(lambda ps: NormSGD(ps, lr=0.1)))
    _case(results, ("refuse", "not_elementwise_child"), lambda: refused(lambda ps: NormSGDChild(ps, lr=0.1)))

    def skip_nonfinite(kind):
        """Every rank must skip the step, or the shards/replicas would drift apart. FSDP2: a NaN
        in one element of rank 0's gradient shard (the check is a DTensor reduction over the
        mesh). DDP: a NaN in one of rank 0's samples (the all-reduce spreads it, so every rank
        sees the same gradients, as torch's GradScaler also assumes)."""
        model = _fsdp(make_model()) if kind == "fsdp" else DDP(make_model())
        opt = of.AdamW(model.parameters(), lr=1e-2).configure(skip_nonfinite=True)
        train(model, opt, x, y, steps=2)
        before = flat(model.parameters())

        def poison(m):
            if rank == 0:
                g = next(m.parameters()).grad
                g.to_local().view(-1)[0] = math.nan

        if kind == "fsdp":
            train(model, opt, x, y, steps=1, poison=poison)
        else:
            bad_x = x.clone()
            if rank == 0:
                bad_x[1, 2] = math.nan
            train(model, opt, bad_x, y, steps=1)
        skipped = [None] * WORLD
        dist.all_gather_object(skipped, (opt.skipped_steps, torch.equal(flat(model.parameters()), before)))
        train(model, opt, x, y, steps=1)
        return {"per_rank": skipped, "moved_after": not torch.equal(flat(model.parameters()), before)}

    _case(results, ("skip", "fsdp"), lambda: skip_nonfinite("fsdp"))
    _case(results, ("skip", "ddp"), lambda: skip_nonfinite("ddp"))

    from distributed_checkpoint import label, save

    for case in saves:
        _case(results, ("saved", label(case)), save, case, rank, directory)

    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()
