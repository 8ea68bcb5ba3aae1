"""The bucket structure kept between steps (optforge.step_plan) never hides a change: each
step sees the params, gradients and state that a step building everything afresh would see."""

import weakref

import pytest
import torch

import optforge as of
from optforge import step_plan

PATHS = [pytest.param(False, id="foreach"), pytest.param(None, id="default"), pytest.param(True, id="fused")]


def params(n=3, dtype=torch.float64):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, dtype=dtype)) for _ in range(n)]


def step(opt, ps, seed, without=()):
    """One step with fresh gradients, none for the params at the positions ``without``."""
    g = torch.Generator().manual_seed(seed)
    for i, p in enumerate(ps):
        p.grad = None if i in without else torch.randn(p.shape, dtype=p.dtype, generator=g)
    opt.step()


def twins(cls, fused, **kw):
    a, b = params(), params()
    return a, cls(a, fused=fused, **kw), b, cls(b, fused=fused, **kw)


def replan(opt):
    """Make ``opt``'s next step build its buckets afresh."""
    step_plan.forget(opt)


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("cls", [of.AdamW, of.Lion])
def test_a_planned_step_equals_a_fresh_one(cls, fused):
    a, opt_a, b, opt_b = twins(cls, fused, lr=0.1)
    for k in range(6):
        step(opt_a, a, k)
        replan(opt_b)
        step(opt_b, b, k)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert step_plan.plan_for(opt_a)


@pytest.mark.parametrize("fused", PATHS)
def test_a_replaced_state_dict_is_seen(fused):
    ps = params()
    opt = of.AdamW(ps, lr=0.1, fused=fused)
    for k in range(3):
        step(opt, ps, k)
    opt.state[ps[1]] = {}                        # this param starts over
    alone = torch.nn.Parameter(ps[1].detach().clone())
    first = of.AdamW([alone], lr=0.1, fused=fused)
    step(opt, ps, 7)
    alone.grad = ps[1].grad.clone()
    first.step()
    assert torch.equal(alone, ps[1])
    assert [opt.state[p]["step"].item() for p in ps] == [4, 1, 4]


@pytest.mark.parametrize("fused", PATHS)
def test_a_replaced_state_tensor_and_a_moved_param_are_seen(fused):
    a, opt, b, ref = twins(of.AdamW, fused, lr=0.1)
    for k in range(3):
        step(opt, a, k)
        step(ref, b, k)
    opt.state[a[0]]["exp_avg"] = torch.zeros(4, dtype=torch.float64)
    ref.state[b[0]]["exp_avg"].zero_()
    a[2].data = a[2].data.clone()                # new memory
    step(opt, a, 5)
    step(ref, b, 5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert opt.state[a[0]]["exp_avg"].abs().sum() > 0     # the new tensor was updated


@pytest.mark.parametrize("fused", PATHS)
def test_gradients_that_come_and_go_are_seen(fused):
    a, opt, b, ref = twins(of.Adam, fused, lr=0.1)
    for k in range(8):
        without = {k % 3} if k % 3 == 1 or k == 5 else set()   # kept plans with and without all
        before = [x.clone() for x in a]
        step(opt, a, k, without)
        replan(ref)
        step(ref, b, k, without)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert all(torch.equal(a[i], before[i]) != (i not in without) for i in range(3))


def test_a_sparse_gradient_on_a_planned_group_is_still_refused():
    ps = params()
    opt = of.AdamW(ps, lr=0.1)
    step(opt, ps, 0)
    ps[0].grad = ps[0].grad.to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


def test_a_sparse_gradient_beside_a_missing_one_is_seen():
    a, opt, b, ref = twins(of.SGD, False, lr=0.1)
    for k in range(4):
        step(opt, a, k)
        replan(ref)
        step(ref, b, k)
    for ps in (a, b):
        ps[0].grad, ps[2].grad = ps[0].grad.to_sparse(), None
    replan(ref)
    before = a[2].clone()
    opt.step()
    ref.step()
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and torch.equal(a[2], before)


def test_load_state_dict_drops_the_plans():
    ps = params()
    opt = of.AdamW(ps, lr=0.1)
    step(opt, ps, 0)
    assert step_plan.plan_for(opt)
    opt.load_state_dict(opt.state_dict())
    assert not step_plan.plan_for(opt)


@pytest.mark.parametrize("fused", PATHS)
def test_a_kept_plan_lets_go_of_the_gradients(fused):
    """zero_grad() frees the gradients as it would without a plan: none is kept for the next step."""
    ps = params()
    opt = of.Lion(ps, lr=0.1, fused=fused)
    for k in range(3):
        step(opt, ps, k)
    grads = [weakref.ref(p.grad) for p in ps]
    opt.zero_grad()
    assert step_plan.plan_for(opt) and all(g() is None for g in grads)


@pytest.mark.parametrize("fused", PATHS)
def test_a_replaced_state_tensor_of_a_kept_plan_is_seen(fused):
    """Only state entries change (no param moves): a kept plan still sees them, the fused path too."""
    a, opt, b, ref = twins(of.Lion, fused, lr=0.1)
    for k in range(4):
        step(opt, a, k)
        step(ref, b, k)
    opt.state[a[0]]["exp_avg"] = torch.zeros(4, dtype=torch.float64)
    ref.state[b[0]]["exp_avg"].zero_()
    for k in range(4, 6):
        step(opt, a, k)
        step(ref, b, k)
    opt.state[a[1]]["step"] = torch.tensor(6.0)                # the same count, a new tensor
    for k in range(6, 8):
        step(opt, a, k)
        step(ref, b, k)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert opt.state[a[0]]["exp_avg"].abs().sum() > 0 and opt.state[a[1]]["step"].item() == 8
