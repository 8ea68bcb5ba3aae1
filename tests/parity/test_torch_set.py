"""Float64 parity with torch.optim's elementwise optimizers (NAdam, RMSprop, Adagrad, Adamax,
Adadelta, Rprop, ASGD): full 50-step trajectories over torch's own input configurations
(``common_optimizers.optim_inputs_func_*``), two param groups, rtol 1e-10; and state dicts that
load both ways mid-run."""

import copy
import math

import pytest
import torch

import optforge as of
import optforge.eager_chunks as eager_chunks
from helpers import assert_moves, assert_same_trajectory, make_model, trajectory

co = pytest.importorskip("torch.testing._internal.common_optimizers",
                         reason="torch's optimizer input configurations need the expecttest package")
torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True

# optforge class, torch class, torch's inputs, the lr to use where an input leaves it default
# (None: the default, which moves the small model enough)
FAMILIES = {
    "nadam": (of.NAdam, torch.optim.NAdam, co.optim_inputs_func_nadam, None),
    "rmsprop": (of.RMSprop, torch.optim.RMSprop, co.optim_inputs_func_rmsprop, None),
    "adagrad": (of.Adagrad, torch.optim.Adagrad, co.optim_inputs_func_adagrad, None),
    "adamax": (of.Adamax, torch.optim.Adamax, co.optim_inputs_func_adamax, None),
    "adadelta": (of.Adadelta, torch.optim.Adadelta, co.optim_inputs_func_adadelta, None),
    "rprop": (of.Rprop, torch.optim.Rprop, co.optim_inputs_func_rprop, None),
    "asgd": (of.ASGD, torch.optim.ASGD, co.optim_inputs_func_asgd, None),
}


def _groups(model, kwargs):
    """Two param groups, the second with its own lr and weight decay (when the input has them)."""
    big = [p for p in model.parameters() if p.dim() > 1]
    small = [p for p in model.parameters() if p.dim() <= 1]
    second = {"params": small}
    if "lr" in kwargs:
        second["lr"] = kwargs["lr"] * 0.5
    if kwargs.get("weight_decay"):
        second["weight_decay"] = kwargs["weight_decay"] * 0.3
    return [{"params": big}, second]


def _cases():
    out = []
    for name, (ours, theirs, inputs, lr) in FAMILIES.items():
        for inp in inputs("cpu"):
            kwargs = dict(inp.kwargs)
            if lr is not None:
                kwargs.setdefault("lr", lr)
            out.append(pytest.param(ours, theirs, kwargs, id=f"{name}-{inp.desc}"))
    return out


@pytest.mark.parametrize("ours,theirs,kwargs", _cases())
def test_trajectory_matches_torch(ours, theirs, kwargs):
    model_a, model_b = make_model(), make_model()
    opt_a = ours(_groups(model_a, kwargs), **kwargs)
    opt_b = theirs(_groups(model_b, kwargs), **kwargs, foreach=False)
    a, b = trajectory(model_a, opt_a), trajectory(model_b, opt_b)
    assert_moves(a)
    assert_same_trajectory(a, b)


@pytest.mark.parametrize("ours,theirs,kwargs", [c for c in _cases() if c.id.startswith("adagrad-")])
def test_adagrad_foreach_path_matches_torch(ours, theirs, kwargs):
    """The default runs torch's fused Adagrad kernel (optforge.paths); the foreach path too must
    match torch."""
    model_a, model_b = make_model(), make_model()
    opt_a = ours(_groups(model_a, kwargs), **kwargs, fused=False)
    opt_b = theirs(_groups(model_b, kwargs), **kwargs, foreach=False)
    a, b = trajectory(model_a, opt_a), trajectory(model_b, opt_b)
    assert_moves(a)
    assert_same_trajectory(a, b)


def _resumed(first, second, kwargs):
    """10 steps of ``first``, its state loaded into ``second``, 20 more steps of each."""
    model_a, model_b = make_model(), make_model()
    opt_a = first(_groups(model_a, kwargs), **kwargs)
    trajectory(model_a, opt_a, steps=10)
    model_b.load_state_dict(model_a.state_dict())
    opt_b = second(_groups(model_b, kwargs), **kwargs)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as torch.save/load would
    return trajectory(model_a, opt_a, steps=20), trajectory(model_b, opt_b, steps=20)


def _torch(cls):
    return lambda params, **kw: cls(params, foreach=False, **kw)


@pytest.mark.parametrize("ours,theirs,kwargs", _cases())
def test_torch_state_loads_into_optforge(ours, theirs, kwargs):
    assert_same_trajectory(*_resumed(_torch(theirs), ours, kwargs))


@pytest.mark.parametrize("ours,theirs,kwargs", _cases())
def test_optforge_state_loads_into_torch(ours, theirs, kwargs):
    assert_same_trajectory(*_resumed(ours, _torch(theirs), kwargs))


@pytest.mark.parametrize("kwargs", [dict(lr=0.1), dict(lr=0.1, lr_decay=0.05, initial_accumulator_value=0.2,
                                                          maximize=True)])
def test_adagrad_sparse_gradients_match_torch(kwargs):
    """A sparse embedding (rows repeat within a batch) next to a dense layer in one group:
    the sparse rows update as torch's sparse path computes, the others stay untouched."""
    def model():
        torch.manual_seed(0)
        return torch.nn.ModuleList([torch.nn.Embedding(10, 3, sparse=True), torch.nn.Linear(3, 1)]).double()

    def run(net, opt):
        out = []
        g = torch.Generator().manual_seed(2)
        for _ in range(30):
            idx = torch.randint(0, 6, (8,), generator=g)       # rows 6..9 never get a gradient
            opt.zero_grad()
            net[1](net[0](idx)).pow(2).mean().backward()
            opt.step()
            out.append(torch.cat([p.detach().flatten() for p in net.parameters()]).clone())
        return out

    net_a, net_b = model(), model()
    a = run(net_a, of.Adagrad(net_a.parameters(), **kwargs))
    b = run(net_b, torch.optim.Adagrad(net_b.parameters(), foreach=False, **kwargs))
    assert_moves(a)
    assert torch.equal(a[-1][18:30], a[0][18:30])                # rows 6..9: untouched
    assert_same_trajectory(a, b)


@pytest.mark.parametrize("kwargs", [dict(t0=5), dict(t0=20, lambd=0.1, alpha=0.5, weight_decay=0.1)])
def test_asgd_average_matches_torch(kwargs):
    """ASGD's average ``ax`` (not part of the parameter trajectory) after 50 steps, with
    averaging from step t0 on, and its eta and mu."""
    model_a, model_b = make_model(), make_model()
    opt_a = of.ASGD(_groups(model_a, {"lr": 1e-2}), lr=1e-2, **kwargs)
    opt_b = torch.optim.ASGD(_groups(model_b, {"lr": 1e-2}), lr=1e-2, foreach=False, **kwargs)
    assert_same_trajectory(trajectory(model_a, opt_a), trajectory(model_b, opt_b))
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        a, b = opt_a.state[p], opt_b.state[q]
        assert not torch.equal(a["ax"], p)               # the average is not the last iterate
        torch.testing.assert_close(a["ax"], b["ax"], rtol=1e-10, atol=1e-12)
        assert torch.equal(a["eta"], b["eta"]) and torch.equal(a["mu"], b["mu"])


# gradient entries whose products with the previous gradient are inf, NaN (inf * 0), zero or
# underflow to zero in float32 (1e-30 squared) or float64 (1e-200 squared)
_SPECIAL = [math.nan, math.inf, -math.inf, 1e-30, -1e-30, 1e-200, -1e-200, 0.0, -0.0, 1e30, -1e30]


@pytest.mark.parametrize("chunk", [None, 16], ids=["whole", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.complex64])
@pytest.mark.parametrize("kwargs", [{}, dict(lr=0.1, etas=(0.3, 3.0), step_sizes=(1e-3, 1.0), maximize=True)],
                         ids=["default", "options"])
def test_rprop_equals_torch_bit_for_bit_on_special_gradients(kwargs, dtype, chunk, monkeypatch):
    """Rprop's choices (grow, shrink or keep each step size; drop a gradient whose sign flipped)
    are computed foreach as arithmetic on sign(g * prev): parameters and state equal torch's
    exactly where gradients are inf, NaN, zero or so small that the product underflows."""
    monkeypatch.setattr(eager_chunks, "CHUNK", chunk)
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
             for shape in [(7, 5), (13,), (1,)]]
    ours = [torch.nn.Parameter(x.clone()) for x in start]
    theirs = [torch.nn.Parameter(x.clone()) for x in start]
    opt_a, opt_b = of.Rprop(ours, **kwargs), torch.optim.Rprop(theirs, foreach=False, **kwargs)
    special = torch.tensor(_SPECIAL, dtype=torch.float64)
    for step in range(12):
        for a, b in zip(ours, theirs):
            real = torch.view_as_real(a.detach()) if a.is_complex() else a.detach()
            g = torch.randn(real.shape, generator=gen, dtype=torch.float64)
            pick = torch.randint(0, len(_SPECIAL), g.shape, generator=gen)
            g = torch.where(torch.rand(g.shape, generator=gen) < 0.3, special[pick], g).to(real.dtype)
            a.grad = torch.view_as_complex(g) if a.is_complex() else g
            b.grad = a.grad.clone()
        opt_a.step()
        opt_b.step()
        for a, b in zip(ours, theirs):
            for x, y in [(a, b), *((opt_a.state[a][k], opt_b.state[b][k]) for k in ("prev", "step_size"))]:
                x, y = (torch.view_as_real(z.detach()) if z.is_complex() else z.detach() for z in (x, y))
                assert torch.equal(x.isnan(), y.isnan()), f"step {step}"
                assert torch.equal(x.nan_to_num(), y.nan_to_num()), f"step {step}"


def test_nadam_mu_products_round_as_torchs_with_differing_steps_and_after_a_load():
    """NAdam multiplies the bucket's mu_product entries at once: in float32 they must equal
    torch's, entry by entry, also when the parameters' step counts differ (one joins late)
    and after torch's state dict is loaded mid-run."""
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(4)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kwargs = dict(lr=1e-2, momentum_decay=0.4)     # products that change quickly
    opt_a, opt_b = of.NAdam(ours, **kwargs), torch.optim.NAdam(theirs, **kwargs, foreach=False)
    for step in range(30):
        for i, (a, b) in enumerate(zip(ours, theirs)):
            g = None if i == 3 and step < 5 else torch.randn_like(a)
            a.grad, b.grad = g, None if g is None else g.clone()
        opt_a.step()
        opt_b.step()
        if step == 15:
            opt_a = of.NAdam(ours, **kwargs)
            opt_a.load_state_dict(copy.deepcopy(opt_b.state_dict()))
    for a, b in zip(ours, theirs):
        assert opt_a.state[a]["mu_product"].dtype == torch.float32
        assert torch.equal(opt_a.state[a]["mu_product"], opt_b.state[b]["mu_product"])
        torch.testing.assert_close(a, b)
