"""Lookahead (optforge.Lookahead): float64 parity with the paper's Algorithm 1 written per
tensor below (and with pytorch_optimizer's Lookahead when installed), over any base optimizer;
param groups shared with the base (schedulers), lazy slow weights, add_param_group, state_dict
round trips (bit-identical continuation, dtype change, map_location, base-only), the factory's
``lookahead_`` names."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn

import optforge as of
from helpers import assert_moves, assert_same_trajectory, batch, make_model, trajectory, two_groups

BASES = {
    "torch_sgd": lambda groups: torch.optim.SGD(groups, lr=1e-2, momentum=0.9),
    "torch_adamw": lambda groups: torch.optim.AdamW(groups, lr=1e-2),
    "adamw": lambda groups: of.AdamW(groups, lr=1e-2),
    "adamw_fused": lambda groups: of.AdamW(groups, lr=1e-2, fused=True),
    "compass": lambda groups: of.Compass(groups, lr=1e-2, centralization=0.5),
    "compass_fused": lambda groups: of.Compass(groups, lr=1e-2, fused=True),
}


def make_base(name: str, model: nn.Module) -> torch.optim.Optimizer:
    return BASES[name](two_groups(model, 1e-2, 0.1))


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def reference_lookahead(base_name: str, k: int, alpha: float, steps: int = 50) -> list[torch.Tensor]:
    """Zhang et al. (2019), Algorithm 1, one tensor at a time: the base optimizer takes the
    inner steps, every k-th step phi <- phi + alpha (theta - phi), theta <- phi."""
    model = make_model()
    base = make_base(base_name, model)
    params = list(model.parameters())
    phi = [p.detach().clone() for p in params]                 # phi_0 = theta_0
    x, y = batch()
    out = []
    for t in range(1, steps + 1):
        base.zero_grad()
        loss_of(model, x, y).backward()
        base.step()                                            # theta_{t,i}: the inner optimizer
        if t % k == 0:
            with torch.no_grad():
                for theta, slow in zip(params, phi):
                    slow.add_(theta - slow, alpha=alpha)       # phi_t = phi_{t-1} + alpha (theta - phi_{t-1})
                    theta.copy_(slow)                          # theta_{t+1,0} = phi_t
        out.append(flat(model))
    return out


@pytest.mark.parametrize("k,alpha", [(5, 0.5), (3, 0.8), (1, 0.3)])
@pytest.mark.parametrize("base_name", list(BASES))
def test_lookahead_matches_algorithm_1(base_name, k, alpha):
    ref = reference_lookahead(base_name, k, alpha)
    model = make_model()
    ours = trajectory(model, of.Lookahead(make_base(base_name, model), k=k, alpha=alpha))
    assert_moves(ours)
    assert_same_trajectory(ours, ref)
    plain_model = make_model()
    plain = trajectory(plain_model, make_base(base_name, plain_model))
    assert (plain[-1] - ours[-1]).abs().max() > 1e-4          # Lookahead is not a no-op


def test_alpha_one_is_the_base_optimizer_alone():
    model = make_model()
    ours = trajectory(model, of.Lookahead(make_base("adamw", model), k=2, alpha=1.0))
    model = make_model()
    assert_same_trajectory(ours, trajectory(model, make_base("adamw", model)))


@pytest.mark.parametrize("k,alpha", [(5, 0.5), (4, 0.8)])
def test_lookahead_matches_pytorch_optimizer(k, alpha):
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    model = make_model()
    ref = trajectory(model, pytorch_optimizer.Lookahead(make_base("torch_adamw", model), k=k, alpha=alpha))
    model = make_model()
    ours = trajectory(model, of.Lookahead(make_base("torch_adamw", model), k=k, alpha=alpha))
    assert_same_trajectory(ours, ref)


@pytest.mark.parametrize("kwargs,shown", [
    (dict(k=0), "k=0"), (dict(k=2.5), "k=2.5"), (dict(k=True), "k=True"), (dict(k="5"), "k='5'"),
    (dict(alpha=-0.1), "alpha=-0.1"), (dict(alpha=1.5), "alpha=1.5"), (dict(alpha=math.nan), "alpha=nan"),
    (dict(alpha=True), "alpha=True"),
])
def test_bad_k_or_alpha_is_a_value_error_naming_it(kwargs, shown):
    base = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)
    with pytest.raises(ValueError, match=f"invalid {shown}"):
        of.Lookahead(base, **kwargs)


def test_wraps_only_an_optimizer_instance():
    with pytest.raises(TypeError, match="optimizer instance"):
        of.Lookahead(torch.optim.SGD)


# ---- the wrapper is the base, as far as the ecosystem can tell --------------------------------
def test_shares_param_groups_state_and_defaults_with_the_base():
    model = make_model()
    base = make_base("adamw", model)
    opt = of.Lookahead(base)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is base.param_groups and opt.state is base.state and opt.defaults is base.defaults
    trajectory(model, opt, steps=3)
    assert set(opt.state[model[0].weight]) >= {"step", "exp_avg", "exp_avg_sq"}
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))   # the base replaces its list: still shared
    assert opt.param_groups is base.param_groups
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    text = repr(opt)
    assert text.startswith("Lookahead(k=5, alpha=0.5) wrapping\n  AdamW (") and "lookahead_step: 3" in text


@pytest.mark.parametrize("make_scheduler", [
    lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
    lambda opt: of.schedules.warmup_cosine(opt, warmup_steps=2, total_steps=10),
], ids=["torch_steplr", "optforge_warmup_cosine"])
def test_a_scheduler_on_the_wrapper_sets_the_lr_the_base_uses(make_scheduler):
    w = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    base = torch.optim.SGD([w], lr=1.0)
    opt = of.Lookahead(base, k=100)                           # no slow step inside this test
    with warnings.catch_warnings():
        warnings.simplefilter("error")                         # no "scheduler before optimizer" warning
        sched = make_scheduler(opt)
        for _ in range(4):
            lr = base.param_groups[0]["lr"]
            before = w.detach().clone()
            w.grad = torch.ones_like(w)
            opt.step()
            sched.step()
            torch.testing.assert_close(before - w.detach(), torch.full_like(before, lr))   # the step used it
            assert base.param_groups[0]["lr"] != lr or lr == 0.0
    assert base.param_groups[0]["initial_lr"] == 1.0


def test_a_step_the_base_skips_is_not_counted():
    w = nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = of.Lookahead(of.SGD([w], lr=0.1).configure(skip_nonfinite=True), k=2)
    w.grad = torch.tensor([1.0, math.inf], dtype=torch.float64)
    opt.step()
    assert opt.param_groups[0]["lookahead_step"] == 0
    assert torch.equal(w.detach(), torch.ones(2, dtype=torch.float64))


# ---- lazy slow weights, frozen params, groups added later -------------------------------------
def test_slow_weights_are_taken_at_the_first_step_from_the_weights_then():
    model = make_model()
    opt = of.Lookahead(make_base("torch_sgd", model), k=3)
    assert opt.slow_weights == {}
    trained = make_model(seed=7)                               # a checkpoint loaded after building opt
    model.load_state_dict(trained.state_dict())
    model[0].bias.requires_grad_(False)                        # frozen: no slow copy
    x, y = batch()
    loss_of(model, x, y).backward()
    opt.step()
    assert model[0].bias not in opt.slow_weights
    assert torch.equal(opt.slow_weights[model[0].weight], trained[0].weight.detach())


@pytest.mark.parametrize("make_sgd", [torch.optim.SGD, of.SGD], ids=["torch_sgd", "sgd"])
def test_a_param_frozen_mid_cycle_is_left_where_it_is(make_sgd):
    """Frozen after the base moved it (requires_grad off, grad None): the slow step leaves it
    alone (the paper's rule would pull it towards its slow weights). Unfrozen, it takes fresh
    slow weights from where it is. SGD steps of 0.25 on weights of 1, k=2, alpha=0.5: exact."""
    a = nn.Parameter(torch.ones(3, dtype=torch.float64))
    b = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = of.Lookahead(make_sgd([a, b], lr=0.25), k=2, alpha=0.5)

    def step():
        for w in (a, b):
            w.grad = torch.ones_like(w) if w.requires_grad else None
        opt.step()

    step(), step()                              # theta 0.75, 0.5; sync: phi = theta = 0.75
    step()                                      # theta 0.5: b moved since the sync
    b.requires_grad_(False)
    step()                                      # sync: a <- 0.75 + 0.5 (0.25 - 0.75) = 0.5
    assert torch.equal(a.detach(), torch.full_like(a, 0.5))
    assert torch.equal(b.detach(), torch.full_like(b, 0.5))   # not 0.75 + 0.5 (0.5 - 0.75)
    assert b not in opt.slow_weights            # no copy kept for a frozen param
    step(), step()
    assert torch.equal(b.detach(), torch.full_like(b, 0.5))
    b.requires_grad_(True)
    step()                                      # phi_0 = 0.5, theta 0.25
    assert torch.equal(opt.slow_weights[b], torch.full_like(b, 0.5))
    step()                                      # theta 0; sync: b <- 0.5 + 0.5 (0 - 0.5)
    assert torch.equal(b.detach(), torch.full_like(b, 0.25))


def test_a_group_added_later_has_its_own_cycle_and_alpha():
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(4, dtype=torch.float64))
    b = nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = of.Lookahead(of.SGD([a], lr=0.1), k=3, alpha=0.5)

    def grads():
        a.grad, b.grad = 2 * a.detach(), 2 * b.detach()       # d/dw |w|^2

    for _ in range(2):
        grads()
        opt.step()
    opt.add_param_group({"params": [b], "lr": 0.2, "lookahead_alpha": 0.25})
    group = opt.param_groups[1]
    assert (group["lookahead_k"], group["lookahead_alpha"], group["lookahead_step"]) == (3, 0.25, 0)
    b0 = b.detach().clone()
    for _ in range(3):                                         # b: slow taken now, synced after 3 steps
        grads()
        opt.step()
    fast = b0 * 0.6 ** 3                                       # three SGD steps on |b|^2: b <- b (1 - 2 lr)
    torch.testing.assert_close(b.detach(), b0 + 0.25 * (fast - b0), rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="invalid lookahead_k=0"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(1))], "lookahead_k": 0})
    with pytest.raises(ValueError, match="unknown hyperparameter 'lookahead_kk'"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(1))], "lookahead_kk": 2})


# ---- state_dict -----------------------------------------------------------------------------------
def save_and_load(state_dict, map_location=None):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location=map_location, weights_only=True)


@pytest.mark.parametrize("base_name", ["torch_adamw", "adamw", "compass_fused", "torch_sgd"])
def test_state_dict_round_trip_continues_bit_identically(base_name):
    model = make_model()
    uninterrupted = trajectory(model, of.Lookahead(make_base(base_name, model), k=3, alpha=0.6), steps=20)

    model = make_model()
    opt = of.Lookahead(make_base(base_name, model), k=3, alpha=0.6)
    first = trajectory(model, opt, steps=10)                   # stops mid-cycle: 10 % 3 == 1
    sd = opt.state_dict()
    assert "lookahead_slow" in sd["state"][0] and sd["param_groups"][0]["lookahead_step"] == 10
    assert "lookahead_slow" not in opt.state[model[0].weight]  # the base's own state is untouched
    saved_model, saved_opt = save_and_load(model.state_dict()), save_and_load(sd)

    resumed = make_model(seed=3)
    resumed.load_state_dict(saved_model)
    opt2 = of.Lookahead(make_base(base_name, resumed), k=7, alpha=0.1)   # the saved k, alpha win
    opt2.load_state_dict(saved_opt)
    assert (opt2.param_groups[0]["lookahead_k"], opt2.param_groups[0]["lookahead_alpha"]) == (3, 0.6)
    loaded = opt2.slow_weights[opt2.param_groups[0]["params"][0]]
    assert torch.equal(loaded, saved_opt["state"][0]["lookahead_slow"])
    assert loaded.data_ptr() != saved_opt["state"][0]["lookahead_slow"].data_ptr()   # a copy
    rest = trajectory(resumed, opt2, steps=10)
    assert_same_trajectory(first + rest, uninterrupted, rtol=0, atol=0)


def test_load_casts_slow_weights_to_each_params_dtype_and_device():
    model32 = make_model(dtype=torch.float32)
    opt = of.Lookahead(of.AdamW(two_groups(model32, 1e-2, 0.1)), k=4)
    trajectory(model32, opt, steps=6)
    saved = save_and_load(opt.state_dict(), map_location="cpu")

    model64 = make_model(dtype=torch.float64)
    model64.load_state_dict(model32.state_dict())
    opt64 = of.Lookahead(of.AdamW(two_groups(model64, 1e-2, 0.1)), k=4)
    opt64.load_state_dict(saved)
    for p, p32 in zip(model64.parameters(), model32.parameters()):
        slow = opt64.slow_weights[p]
        assert slow.dtype == torch.float64 and slow.device == p.device
        torch.testing.assert_close(slow, opt.slow_weights[p32].double(), rtol=0, atol=0)
    assert_moves([flat(model64)] + trajectory(model64, opt64, steps=4))   # step 8 syncs: all float64


def test_a_base_only_state_dict_restores_the_base_and_restarts_lookahead():
    model = make_model()
    base = make_base("adamw", model)
    trajectory(model, base, steps=5)
    saved = save_and_load(base.state_dict())

    resumed = make_model()
    resumed.load_state_dict(model.state_dict())
    opt = of.Lookahead(make_base("adamw", resumed), k=3)
    trajectory(resumed, opt, steps=1)                          # stale slow weights, to be dropped
    opt.load_state_dict(saved)
    assert opt.slow_weights == {} and [g["lookahead_step"] for g in opt.param_groups] == [0, 0]
    assert opt.state[resumed[0].weight]["step"] == 5
    start = {p: p.detach().clone() for p in resumed.parameters()}
    trajectory(resumed, opt, steps=1)
    assert all(torch.equal(opt.slow_weights[p], start[p]) for p in resumed.parameters())


def test_load_rejects_slow_weights_of_another_shape():
    model = make_model()
    opt = of.Lookahead(make_base("adamw", model))
    trajectory(model, opt, steps=1)
    sd = opt.state_dict()
    sd["state"][0] = {**sd["state"][0], "lookahead_slow": torch.zeros(2)}
    with pytest.raises(ValueError, match="'lookahead_slow' of parameter 0 has shape"):
        opt.load_state_dict(sd)


def test_state_dict_by_name_keeps_slow_weights_and_counters():
    model = make_model()
    opt = of.Lookahead(make_base("adamw", model), k=3)
    trajectory(model, opt, steps=4)
    saved = copy.deepcopy(of.state_dict_by_name(opt, model))
    assert "lookahead_slow" in saved["state"]["0.weight"]
    resumed = make_model()
    resumed.load_state_dict(model.state_dict())
    opt2 = of.Lookahead(make_base("adamw", resumed), k=3)
    of.load_state_dict_by_name(opt2, resumed, saved)
    assert [g["lookahead_step"] for g in opt2.param_groups] == [4, 4]
    ours, uninterrupted = trajectory(resumed, opt2, steps=5), trajectory(model, opt, steps=5)
    assert_same_trajectory(ours, uninterrupted, rtol=0, atol=0)


def test_deepcopy_copies_the_whole_wrapper():
    model = make_model()
    opt = of.Lookahead(make_base("adamw", model), k=2)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)     # patches opt.step: the copy must not share it
    trajectory(model, opt, steps=3)
    twin = copy.deepcopy(opt)
    assert twin.param_groups is twin.base_optimizer.param_groups and twin.k == 2
    assert twin.param_groups[0]["params"][0] is not opt.param_groups[0]["params"][0]
    assert set(twin.slow_weights) == {p for g in twin.param_groups for p in g["params"]}
    for p in (p for g in twin.param_groups for p in g["params"]):   # the copy steps its own params
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    twin.step()
    assert all(torch.equal(a, p) for a, p in zip(before, (p for g in opt.param_groups for p in g["params"])))
    assert twin.param_groups[0]["lookahead_step"] == 4 and opt.param_groups[0]["lookahead_step"] == 3


# ---- the factory: "lookahead_" + any registered name -------------------------------------------
def test_factory_lookahead_names():
    model = make_model()
    opt = of.create_optimizer(model, "Lookahead_LodeW", lr=1e-3, weight_decay=0.05, lookahead_k=3,
                              lookahead_alpha=0.8)
    assert type(opt) is of.Lookahead and type(opt.base_optimizer) is of.Compass
    assert (opt.k, opt.alpha) == (3, 0.8)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.05]   # the usual decay split
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-3]
    default = of.create_optimizer(model, " lookahead_adamw ")
    assert (default.k, default.alpha, type(default.base_optimizer)) == (5, 0.5, of.AdamW)
    assert "lookahead_adamw" not in of.list_optimizers()


@pytest.mark.parametrize("name,kwargs,message", [
    ("lookahead_adamx", {}, r"unknown optimizer 'lookahead_adamx'; did you mean .*'lookahead_adam'"),
    ("lookahead", {}, r"'lookahead_<optimizer>', e.g. 'lookahead_adamw'"),
    ("adamw", dict(lookahead_k=3), r"lookahead_k configure Lookahead.*'lookahead_adamw'"),
    ("lookahead_adamw", dict(lookahead_k=0), r"invalid lookahead_k=0"),
    ("lookahead_adamw", dict(lookahead_alpha=2.0), r"invalid lookahead_alpha=2.0"),
    ("lookahead_adamw", dict(lookahead_kk=3), r"'lookahead_kk' \(did you mean 'lookahead_k'\?\)"),
    ("lookahead_sgd", dict(betas=(0.9, 0.99)), r"SGD \('sgd'\) has no argument 'betas'"),
])
def test_factory_bad_lookahead_input(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        of.create_optimizer(nn.Linear(3, 2), name, **kwargs)


def test_argparse_accepts_lookahead_names():
    import argparse

    parser = argparse.ArgumentParser()
    of.add_optimizer_args(parser)
    args = parser.parse_args(["--optimizer_type", "lookahead_adamw", "--optimizer_args", "lookahead_k=4"])
    opt = of.optimizer_from_args(nn.Linear(3, 2), args)
    assert type(opt) is of.Lookahead and opt.k == 4


def test_complex_params_step_as_their_real_pairs():
    """A complex parameter moves bitwise as its view_as_real copy, slow steps included (the
    slow step must not run complex arithmetic, whose rounding differs)."""
    torch.manual_seed(0)
    z = torch.randn(4, 3, dtype=torch.complex64, requires_grad=True)
    r = torch.view_as_real(z).detach().clone().requires_grad_()
    opt_z = of.Lookahead(of.AdamW([z], lr=1e-2), k=2, alpha=0.8)
    opt_r = of.Lookahead(of.AdamW([r], lr=1e-2), k=2, alpha=0.8)
    for _ in range(6):
        g = torch.randn_like(r)
        r.grad, z.grad = g.clone(), torch.view_as_complex(g.clone())
        opt_r.step()
        opt_z.step()
        assert torch.equal(torch.view_as_real(z), r)
