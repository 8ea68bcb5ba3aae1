"""Non-finite gradients, for every registered optimizer on the foreach and the fused path.

Default (as torch.optim): an inf/NaN gradient goes into the update; the parameters it touches
become non-finite. With ``skip_nonfinite`` (``opt.configure(skip_nonfinite=True)`` or per
group) such a step changes nothing at all — parameters, state, step counts — and is counted
in ``opt.skipped_steps``; the next finite step continues as if it had never happened."""

import copy
import math
import pickle
from pathlib import Path

import pytest
import torch
from conformance_cases import (
    INFOS,
    all_optimizers,
    assert_identical,
    assert_same_state,
    flat,
    make,
    make_model,
    mse,
    state_snapshot,
    via_torch_save,
    with_paths,
)

import optforge as of
from helpers import batch

BAD = [pytest.param(math.nan, id="nan"), pytest.param(math.inf, id="inf"), pytest.param(-math.inf, id="-inf")]


def good_step(model, opt, x, y):
    opt.zero_grad()
    mse(model, x, y).backward()
    return opt.step()


def bad_step(model, opt, x, y, value, which=2):
    """A step whose gradient has one non-finite entry (in parameter ``which``)."""
    opt.zero_grad()
    mse(model, x, y).backward()
    list(model.parameters())[which].grad.view(-1)[1] = value
    return opt.step()


# Optimizers that, as their torch.optim twin, read a gradient only through sign(g * prev), and
# torch.sign(nan) is 0: a NaN gradient entry leaves its parameter where it is (docs/reliability.md).
SIGN_ONLY = {"rprop"}


@pytest.mark.parametrize("info,fused", with_paths())
def test_by_default_a_nan_gradient_propagates_as_in_torch(info, fused):
    model = make_model()
    opt = make(info, model.parameters(), fused=fused)
    x, y = batch()
    for _ in range(2):
        good_step(model, opt, x, y)
    bad_step(model, opt, x, y, math.nan)
    params = list(model.parameters())
    if info.name in SIGN_ONLY:
        assert all(p.isfinite().all() for p in params)
        return
    assert not params[2].isfinite().all()
    assert all(p.isfinite().all() for i, p in enumerate(params) if i != 2)   # no update mixes tensors
    assert opt.skipped_steps == 0


def nonfinite_section() -> str:
    text = (Path(__file__).resolve().parents[2] / "docs" / "reliability.md").read_text()
    return text.split("### Non-finite gradients")[1].split("\n#")[0]


@pytest.mark.parametrize("shape", [(4, 5), (6,)], ids=["2d", "1d"])
@pytest.mark.parametrize("info", [pytest.param(i, id=i.name) for i in INFOS if i.elementwise])
def test_where_an_elementwise_optimizer_spreads_a_nan_is_documented(info, shape):
    """docs/reliability.md: an elementwise optimizer keeps a NaN gradient in its element's
    parameter; one that spreads it (gradient centralization mixes a row, and the whole of a
    1-D tensor) must be named there with where it spreads, and spread no further."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape, dtype=torch.float64))
    opt = make(info, [p])
    for _ in range(3):
        p.grad = torch.cos(3 * p.detach())
        opt.step()
    p.grad = torch.cos(3 * p.detach())
    at = (1, 2)[:len(shape)]
    p.grad[at] = math.nan
    opt.step()
    element, row = torch.zeros(shape, dtype=torch.bool), torch.zeros(shape, dtype=torch.bool)
    element[at], row[at[0] if len(shape) > 1 else ...] = True, True
    bad = ~p.isfinite()
    if info.name in SIGN_ONLY:
        assert not bad.any() and info.cls.__name__ in nonfinite_section()
        return
    if torch.equal(bad, element):
        return
    assert torch.equal(bad, row), bad
    section, where = nonfinite_section(), "row" if len(shape) > 1 else "whole of a 1-D parameter"
    assert info.cls.__name__ in section and where in section, (
        f"docs/reliability.md does not say that {info.cls.__name__} spreads a NaN through the {where}")


def test_torch_adam_propagates_too():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p])
    p.grad = torch.tensor([1.0, math.nan, 1.0])
    opt.step()
    assert p[1].isnan() and p[0].isfinite()


@pytest.mark.parametrize("value", BAD)
@pytest.mark.parametrize("info,fused", with_paths())
def test_skip_nonfinite_leaves_everything_untouched(info, fused, value):
    x, y = batch()
    model, ref_model = make_model(), make_model()
    opt = make(info, model.parameters(), fused=fused, weight_decay=0.05).configure(skip_nonfinite=True)
    ref = make(info, ref_model.parameters(), fused=fused, weight_decay=0.05)

    # a bad first step creates no state
    bad_step(model, opt, x, y, value)
    assert opt.skipped_steps == 1 and not opt.state
    for _ in range(3):
        good_step(model, opt, x, y)
        good_step(ref_model, ref, x, y)
    params, state = flat(model.parameters()), state_snapshot(opt)

    def closure():
        opt.zero_grad()
        loss = mse(model, x, y)
        loss.backward()
        model[2].weight.grad.view(-1)[1] = value
        return loss

    assert opt.step(closure).isfinite()        # a closure's loss comes back from a skipped step
    assert opt.skipped_steps == 2
    assert torch.equal(flat(model.parameters()), params)
    assert_same_state(state_snapshot(opt), state)
    a, b = [], []
    for _ in range(3):                         # as if the bad steps had never happened
        good_step(model, opt, x, y)
        good_step(ref_model, ref, x, y)
        a.append(flat(model.parameters()))
        b.append(flat(ref_model.parameters()))
    assert_identical(a, b)
    assert opt.skipped_steps == 2


def test_only_guarded_groups_are_checked_and_a_skip_skips_every_group():
    model = make_model()
    params = list(model.parameters())
    opt = of.Adam([{"params": params[:2], "skip_nonfinite": True}, {"params": params[2:]}], lr=1e-2)
    x, y = batch()
    good_step(model, opt, x, y)
    before = flat(params)
    bad_step(model, opt, x, y, math.nan, which=0)        # guarded group: the whole step is skipped
    assert opt.skipped_steps == 1 and torch.equal(flat(params), before)
    bad_step(model, opt, x, y, math.nan, which=2)        # unguarded group: propagates, as asked
    assert opt.skipped_steps == 1 and params[2].isnan().any()
    assert params[0].isfinite().all()


@pytest.mark.parametrize("info", all_optimizers())
def test_options_are_checked_saved_and_copied(info):
    model = make_model()
    opt = make(info, model.parameters())
    assert opt.configure(skip_nonfinite=True, fp32_state=True) is opt
    assert all(g["skip_nonfinite"] and g["fp32_state"] and not g["stochastic_rounding"]
               for g in opt.param_groups)
    for bad in (1, "yes", None.__class__):
        with pytest.raises(ValueError, match="skip_nonfinite"):
            opt.configure(skip_nonfinite=bad)
    with pytest.raises(ValueError, match="stochastic_rounding"):
        make(info, [{"params": model.parameters(), "stochastic_rounding": 1}])
    x, y = batch()
    good_step(model, opt, x, y)
    bad_step(model, opt, x, y, math.inf)
    assert opt.skipped_steps == 1
    for copied in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert copied.skipped_steps == 1
        assert copied.param_groups[0]["skip_nonfinite"] is True
    fresh = make(info, make_model().parameters())          # the options travel in param_groups
    fresh.load_state_dict(via_torch_save(opt.state_dict()))
    assert fresh.param_groups[0]["skip_nonfinite"] and fresh.param_groups[0]["fp32_state"]
    assert fresh.skipped_steps == 0                        # a count of this process's steps
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))]})
    assert opt.param_groups[-1]["skip_nonfinite"]          # configure() set the default too
