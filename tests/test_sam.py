"""SAM / ASAM (optforge.SAM): float64 parity with Foret et al.'s Algorithm 1 (and Kwon et al.'s
adaptive perturbation) written per tensor below, over any base optimizer; the closure contract,
manual first_step / second_step, param groups shared with the base, state_dict round trip, and
the documented torch.amp.GradScaler pattern (unscale before the norm, skip on inf)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import optforge as of
from helpers import assert_moves, assert_same_trajectory, batch, make_model, two_groups

BASES = {
    "torch_sgd": lambda groups: torch.optim.SGD(groups, lr=1e-2, momentum=0.9),
    "torch_adamw": lambda groups: torch.optim.AdamW(groups, lr=1e-2),
    "adamw": lambda groups: of.AdamW(groups, lr=1e-2),
    "adamw_fused": lambda groups: of.AdamW(groups, lr=1e-2, fused=True),
    "compass": lambda groups: of.Compass(groups, lr=1e-2, centralization=0.5),
}


def make_base(name: str, model: nn.Module, maximize: bool = False) -> torch.optim.Optimizer:
    groups = [{**g, "maximize": maximize} for g in two_groups(model, 1e-2, 0.1)]
    return BASES[name](groups)


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


def sam_trajectory(model: nn.Module, opt: of.SAM, steps: int = 50, sign: float = 1.0) -> list[torch.Tensor]:
    """The documented loop: gradient at w, then step(closure) at the perturbed weights."""
    x, y = batch()
    out = []
    for _ in range(steps):
        opt.zero_grad()
        (sign * loss_of(model, x, y)).backward()
        opt.step(lambda: (sign * loss_of(model, x, y)).backward())
        out.append(flat(model))
    return out


def reference_sam(base_name: str, rho: float, adaptive: bool, eta: float = 0.0,
                  steps: int = 50) -> list[torch.Tensor]:
    """Foret et al. (2021), Algorithm 1 (ASAM: Kwon et al. (2021), T_w = |w| + eta), per tensor:
    e = rho T_w^2 g / ||T_w g|| with one norm over all parameters, g_SAM = grad at w + e, then
    the base optimizer's step from w with g_SAM."""
    model = make_model()
    base = make_base(base_name, model)
    params = [p for group in base.param_groups for p in group["params"]]
    x, y = batch()
    out = []
    for _ in range(steps):
        base.zero_grad()
        loss_of(model, x, y).backward()
        with torch.no_grad():
            t_w = [p.abs() + eta if adaptive else torch.ones_like(p) for p in params]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t * p.grad)
                                                         for t, p in zip(t_w, params)]))   # ||T_w g||_2
            eps = [p.grad * (rho / (norm + 1e-12)) * t * t for t, p in zip(t_w, params)]
            w = [p.detach().clone() for p in params]
            for p, e in zip(params, eps):
                p.add_(e)                                      # w + e(w)
        base.zero_grad()
        loss_of(model, x, y).backward()                        # g_SAM: the gradient at w + e(w)
        with torch.no_grad():
            for p, w0 in zip(params, w):
                p.copy_(w0)
        base.step()
        out.append(flat(model))
    return out


@pytest.mark.parametrize("rho,adaptive,eta", [(0.05, False, 0.0), (0.5, False, 0.0), (0.5, True, 0.0),
                                              (2.0, True, 0.0), (0.5, True, 0.01)])
@pytest.mark.parametrize("base_name", list(BASES))
def test_sam_matches_algorithm_1(base_name, rho, adaptive, eta):
    ref = reference_sam(base_name, rho, adaptive, eta)
    model = make_model()
    ours = sam_trajectory(model, of.SAM(make_base(base_name, model), rho=rho, adaptive=adaptive, eta=eta))
    assert_moves(ours)
    assert_same_trajectory(ours, ref)
    assert (ref[-1] - reference_sam(base_name, 0.0, False)[-1]).abs().max() > 1e-4   # rho matters here


def test_sam_matches_pytorch_optimizer_loosely():
    """pytorch_optimizer's SAM builds its base optimizer itself and takes the norm in float32:
    an independent check of the same algorithm, to float32 precision."""
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    for adaptive in (False, True):
        model = make_model()
        ref_opt = pytorch_optimizer.SAM(two_groups(model, 1e-2, 0.1), torch.optim.AdamW, rho=0.5,
                                        adaptive=adaptive, lr=1e-2)
        ref = sam_trajectory(model, ref_opt, steps=30)
        model = make_model()
        opt = of.SAM(make_base("torch_adamw", model), rho=0.5, adaptive=adaptive)
        ours = sam_trajectory(model, opt, steps=30)
        assert_same_trajectory(ours, ref, rtol=1e-5, atol=1e-7)


def test_maximize_perturbs_towards_lower_objective():
    model = make_model()
    minimizing = sam_trajectory(model, of.SAM(make_base("adamw", model), rho=0.5))
    model = make_model()
    maximizing = sam_trajectory(model, of.SAM(make_base("adamw", model, maximize=True), rho=0.5), sign=-1.0)
    assert_same_trajectory(maximizing, minimizing)


# ---- the closure contract and the manual steps --------------------------------------------------
def test_step_without_closure_says_sam_needs_one_and_shows_how():
    model = make_model()
    opt = of.SAM(make_base("adamw", model))
    x, y = batch()
    loss_of(model, x, y).backward()
    with pytest.raises(ValueError, match="SAM needs a closure") as err:
        opt.step()
    assert "def closure():" in str(err.value) and "opt.step(closure)" in str(err.value)
    assert "first_step" in str(err.value)


def test_manual_steps_equal_step_with_closure():
    x, y = batch()
    model = make_model()
    auto = sam_trajectory(model, of.SAM(make_base("adamw", model), rho=0.3, adaptive=True), steps=10)
    model = make_model()
    opt = of.SAM(make_base("adamw", model), rho=0.3, adaptive=True)
    manual = []
    for _ in range(10):
        loss_of(model, x, y).backward()
        assert opt.first_step(zero_grad=True) is True
        assert all(p.grad is None for p in model.parameters())
        loss_of(model, x, y).backward()
        opt.second_step(zero_grad=True)
        manual.append(flat(model))
    assert_same_trajectory(manual, auto, rtol=0, atol=0)


def test_step_returns_the_closures_loss_and_restores_the_weights_it_perturbed():
    w = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = of.SAM(torch.optim.SGD([w], lr=0.0), rho=0.5)       # lr 0: the base step changes nothing
    (w ** 2).sum().backward()
    seen = []

    def closure():
        seen.append(w.detach().clone())
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    torch.testing.assert_close(seen[0], torch.tensor([3.3, 4.4], dtype=torch.float64))   # w + 0.5 g/||g||
    assert loss.item() == pytest.approx(3.3 ** 2 + 4.4 ** 2)
    assert torch.equal(w.detach(), torch.tensor([3.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(w.grad, 2 * seen[0])           # the base stepped with g at w + e


def test_misuse_of_the_manual_steps_is_an_error():
    w = nn.Parameter(torch.ones(2))
    opt = of.SAM(torch.optim.SGD([w], lr=0.1))
    with pytest.raises(RuntimeError, match="no parameter has a gradient"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.second_step()
    w.grad = torch.ones(2)
    opt.first_step()
    with pytest.raises(RuntimeError, match="called twice"):
        opt.first_step()


@pytest.mark.parametrize("kwargs,shown", [
    (dict(rho=-0.1), "rho=-0.1"), (dict(rho=math.inf), "rho=inf"), (dict(adaptive=1), "adaptive=1"),
    (dict(eps=0.0), "eps=0.0"), (dict(eta=-0.01, adaptive=True), "eta=-0.01"), (dict(eta=0.01), "eta=0.01"),
])
def test_bad_hyperparameters_are_value_errors_naming_them(kwargs, shown):
    with pytest.raises(ValueError, match=f"invalid {shown}"):
        of.SAM(torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1), **kwargs)


# ---- shared groups, schedulers, state_dict -------------------------------------------------------
def test_shares_param_groups_and_a_scheduler_drives_the_base():
    model = make_model()
    base = make_base("torch_sgd", model)
    opt = of.SAM(base, rho=0.05)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is base.param_groups and opt.state is base.state and opt.defaults is base.defaults
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    sam_trajectory(model, opt, steps=1)
    sched.step()
    assert [g["lr"] for g in base.param_groups] == pytest.approx([1e-3, 5e-4])
    assert repr(opt).startswith("SAM(rho=0.05, adaptive=False) wrapping\n  SGD (")


def test_state_dict_round_trip_continues_bit_identically():
    model = make_model()
    uninterrupted = sam_trajectory(model, of.SAM(make_base("adamw", model), rho=0.3), steps=20)
    model = make_model()
    opt = of.SAM(make_base("adamw", model), rho=0.3)
    first = sam_trajectory(model, opt, steps=10)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert set(saved["opt"]) == {"state", "param_groups"}    # the base's own state dict
    resumed = make_model(seed=5)
    resumed.load_state_dict(saved["model"])
    opt2 = of.SAM(make_base("adamw", resumed), rho=0.3)
    opt2.load_state_dict(saved["opt"])
    assert_same_trajectory(first + sam_trajectory(resumed, opt2, steps=10), uninterrupted, rtol=0, atol=0)


def test_lookahead_around_sam():
    model = make_model()
    opt = of.Lookahead(of.SAM(make_base("adamw", model), rho=0.1), k=3)
    traj = sam_trajectory(model, opt, steps=6)
    assert_moves(traj)
    assert opt.param_groups is opt.base_optimizer.base_optimizer.param_groups


# ---- torch.amp.GradScaler: the documented pattern --------------------------------------------------
def amp_step(model, opt, scaler, x, y, poison=None, autocast=False):
    """The docstring's pattern, verbatim apart from the optional inf injection."""
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else torch.enable_grad

    def loss_fn(which):
        with ctx():
            loss = loss_of(model, x, y)
        return loss * math.inf if poison == which else loss

    opt.zero_grad()
    scaler.scale(loss_fn("first")).backward()
    scaler.unscale_(opt)                                       # the norm needs the true gradient
    perturbed = opt.first_step(zero_grad=True, skip_nonfinite=True)
    if perturbed:
        scaler.scale(loss_fn("second")).backward()
        opt.second_step(scaler=scaler)                         # restore w, scaler.step(base)
    scaler.update()
    return perturbed


def test_gradscaler_pattern_matches_unscaled_sam():
    x, y = batch()
    model = make_model()
    plain = sam_trajectory(model, of.SAM(make_base("adamw", model), rho=0.5, adaptive=True), steps=20)
    model = make_model()
    opt = of.SAM(make_base("adamw", model), rho=0.5, adaptive=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    scaled = []
    for _ in range(20):
        assert amp_step(model, opt, scaler, x, y)
        scaled.append(flat(model))
    assert_same_trajectory(scaled, plain)                      # power-of-two scaling is exact
    assert scaler.get_scale() == 2.0 ** 12


@pytest.mark.parametrize("poison", ["first", "second"])
def test_gradscaler_pattern_skips_the_step_on_inf(poison):
    x, y = batch()
    model = make_model()
    opt = of.SAM(make_base("adamw", model), rho=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    amp_step(model, opt, scaler, x, y)
    before, state = flat(model), {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    perturbed = amp_step(model, opt, scaler, x, y, poison=poison)
    assert perturbed is (poison == "second")
    assert torch.equal(flat(model), before)                   # w restored (second) or never moved (first)
    assert all(torch.equal(v, opt.state[model[0].weight][k]) for k, v in state.items())   # base not stepped
    assert scaler.get_scale() == 2.0 ** 11                    # backed off
    amp_step(model, opt, scaler, x, y)                         # and training goes on
    assert torch.isfinite(flat(model)).all() and not torch.equal(flat(model), before)


def test_gradscaler_pattern_with_cpu_autocast_learns():
    x, y = batch(dtype=torch.float32)
    model = make_model(dtype=torch.float32)
    opt = of.SAM(of.AdamW(model.parameters(), lr=1e-2), rho=0.05)
    scaler = torch.amp.GradScaler("cpu")
    start = loss_of(model, x, y).item()
    for _ in range(30):
        amp_step(model, opt, scaler, x, y, autocast=True)
    assert loss_of(model, x, y).item() < 0.5 * start


@pytest.mark.parametrize("adaptive", [False, True])
def test_complex_params_are_perturbed_as_their_real_pairs(adaptive):
    """A complex parameter steps bitwise as its view_as_real copy (ASAM's |w| per part), as
    the base optimizers treat complex parameters."""
    torch.manual_seed(0)
    z = torch.randn(4, 3, dtype=torch.complex64, requires_grad=True)
    r = torch.view_as_real(z).detach().clone().requires_grad_()
    opts = [of.SAM(of.AdamW([p], lr=1e-2), rho=0.5, adaptive=adaptive) for p in (z, r)]
    target = torch.randn_like(r)
    for _ in range(4):
        for p, opt in zip((z, r), opts):
            def closure(p=p):
                loss = ((torch.view_as_real(p) if p.is_complex() else p) - target).pow(2).sum()
                loss.backward()
                return loss
            closure()
            opt.step(closure)
        assert torch.equal(torch.view_as_real(z), r)


def test_sparse_gradients_are_refused_clearly():
    w = nn.Parameter(torch.randn(3, 2))
    w.grad = torch.randn(3, 2).to_sparse()
    opt = of.SAM(of.SGD([w], lr=0.1))
    with pytest.raises(RuntimeError, match="SAM does not support sparse gradients"):
        opt.step(lambda: torch.zeros(()))
