"""fused=True: torch's fused kernels (SGD/Adam family) and the generated single-pass kernel
(everything else) follow the eager trajectory; flat buffers keep torch semantics."""

import copy

import pytest
import torch

import optforge as of
from helpers import assert_moves, assert_same_trajectory, make_model, trajectory, two_groups
from optforge import fused as fused_module

CASES = [
    (of.SGD, dict(momentum=0.9)),                                  # torch's fused SGD
    (of.SGD, dict(momentum=0.9, dampening=0.2, nesterov=False)),  # generated (torch's needs no dampening)
    (of.SGD, dict(momentum=0.9, nesterov=True, weight_decay_mode="decoupled")),
    (of.MomentumSGD, dict()),
    (of.Adam, dict(amsgrad=True)),                                 # torch's fused Adam
    (of.Adam, dict(weight_decay_mode="absolute", maximize=True)),  # generated
    (of.AdamW, dict()),
    (of.AMSGrad, dict()),
    (of.AdamWarmup, dict(warmup=10)),
    (of.Noam, dict(warmup=10, lr=0.5)),
    (of.RAdam, dict()),
    (of.AdaBelief, dict()),
    (of.AdaBelief, dict(rectify=False, amsgrad=True, weight_decay_mode="coupled")),
    (of.Compass, dict(lr=1e-3)),
    (of.Compass, dict(lr=1e-3, centralization=1.0, maximize=True)),
]


def _ids(case):
    cls, kw = case
    return cls.__name__ + "".join(f"-{k}={v}" for k, v in kw.items())


@pytest.fixture(params=[None, 50], ids=["copied", "in-place-from-50"])
def read_in_place(request, monkeypatch):
    """Gradients copied into the flat buffer (the default at these sizes), or read in place by
    a kernel call per parameter from 50 entries on: the conv and first linear weights."""
    if request.param is not None:
        monkeypatch.setitem(fused_module.READ_IN_PLACE, "cpu", request.param)
    return request.param


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_fused_follows_eager(case, read_in_place):
    cls, kw = case
    kw = dict(kw)
    lr = kw.pop("lr", 1e-2)
    model_a, model_b = make_model(), make_model()
    eager = cls(two_groups(model_a, lr, 0.05), **kw)
    fused = cls(two_groups(model_b, lr, 0.05), fused=True, **kw)
    a, b = trajectory(model_a, eager, steps=30), trajectory(model_b, fused, steps=30)
    assert_moves(a)
    assert_same_trajectory(a, b, rtol=1e-9, atol=1e-12)


def test_fused_refused_without_a_kernel():
    class OnlyUpdate(of.Optimizer):
        def __init__(self, params, lr=0.1, *, fused=False):
            super().__init__(params, dict(lr=lr, weight_decay=0.0, weight_decay_mode="coupled",
                                          maximize=False, fused=fused))

        def update(self, group, p, g, s, t):
            p.add_(g, alpha=-group["lr"])

    params = [torch.nn.Parameter(torch.zeros(3))]
    OnlyUpdate(params)  # eager is fine
    with pytest.raises(ValueError, match="fused=True"):
        OnlyUpdate(params, fused=True)


def test_generated_params_become_views_and_state_dict_resumes_exactly(read_in_place):
    """Small params become views into the flat buffer; large ones (read in place) keep their
    own memory and state tensors. Either way a checkpoint resumes bit for bit."""
    model_a = make_model()
    ptrs = [p.data_ptr() for p in model_a.parameters()]
    opt_a = of.Compass(model_a.parameters(), lr=1e-3, fused=True)
    trajectory(model_a, opt_a, steps=1)
    states = [dict(opt_a.state[p]) for p in model_a.parameters()]
    trajectory(model_a, opt_a, steps=4)
    flat = next(iter(opt_a._flat_buckets.values())).flat_param
    for p, ptr, st in zip(model_a.parameters(), ptrs, states):
        if read_in_place and p.numel() >= read_in_place:
            assert p.data_ptr() == ptr and all(opt_a.state[p][k] is st[k] for k in st if k != "step")
        else:
            assert p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    saved_model, saved_opt = copy.deepcopy(model_a.state_dict()), copy.deepcopy(opt_a.state_dict())
    assert all(float(s["step"]) == 5 for s in saved_opt["state"].values())
    expected = trajectory(model_a, opt_a, steps=5)
    model_b = make_model(seed=7)
    model_b.load_state_dict(saved_model)
    opt_b = of.Compass(model_b.parameters(), lr=1e-3, fused=True)
    opt_b.load_state_dict(saved_opt)
    got = trajectory(model_b, opt_b, steps=5)
    for x, y in zip(expected, got):
        assert torch.equal(x, y)


def test_param_without_grad_is_left_alone():
    model = make_model()
    opt = of.RAdam(model.parameters(), lr=1e-2, fused=True)
    trajectory(model, opt, steps=3)
    frozen = model[0].bias
    before = frozen.detach().clone()

    def loss_without_bias(m, x, y):
        out = torch.nn.functional.conv2d(x, m[0].weight)  # the conv bias gets no gradient
        return ((m[4](m[3](m[2](out.flatten(1)))) - y) ** 2).mean()

    trajectory(model, opt, steps=3, loss_fn=loss_without_bias)
    assert frozen.grad is None
    assert torch.equal(frozen.detach(), before)


@pytest.mark.parametrize("cls", [of.AdaBelief, of.Adam], ids=["generated", "torch-fused"])
def test_grads_stay_the_users_tensors(cls, read_in_place):
    """A fused step reads p.grad and leaves it be: the same object on the same memory, with
    its values, after the step (the generated kernel copies it into its flat buffer)."""
    model = make_model()
    opt = cls(model.parameters(), lr=1e-2, fused=True)
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    for _ in range(3):
        opt.zero_grad(set_to_none=False)
        model(x).pow(2).mean().backward()
        grads = [(p.grad, id(p.grad), p.grad.data_ptr(), p.grad.clone()) for p in model.parameters()]
        opt.step()
        for p, (g, ident, ptr, values) in zip(model.parameters(), grads):
            assert p.grad is g and id(p.grad) == ident and p.grad.data_ptr() == ptr
            assert torch.equal(p.grad, values)
    assert isinstance(opt, of.Adam) or opt._flat_buckets     # the generated kernel did run
    if read_in_place and not isinstance(opt, of.Adam):       # only the small ones are copied
        small = sum(p.numel() for p in model.parameters() if p.numel() < read_in_place)
        assert next(iter(opt._flat_buckets.values())).flat_grad.numel() == small


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_and_accumulation_follow_eager(set_to_none):
    """Two backward passes per step accumulate into p.grad, with zero_grad(set_to_none=...)
    between steps: fused steps follow eager ones."""
    model_a, model_b = make_model(), make_model()
    opt_a = of.AdaBelief(model_a.parameters(), lr=1e-2)
    opt_b = of.AdaBelief(model_b.parameters(), lr=1e-2, fused=True)
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    for _ in range(4):
        for model, opt in ((model_a, opt_a), (model_b, opt_b)):
            opt.zero_grad(set_to_none=set_to_none)
            model(x).pow(2).mean().backward()
            model(x[:2]).abs().mean().backward()          # accumulates into p.grad
            opt.step()
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-10, atol=1e-13)
    flat = next(iter(opt_b._flat_buckets.values())).flat_grad
    assert not any(p.grad.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
                   for p in model_b.parameters())


def test_lr_schedule_does_not_recompile():
    from torch._dynamo.utils import counters

    model = make_model()
    opt = of.AdaBelief(model.parameters(), lr=1e-2, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k))
    x, y = torch.randn(4, 2, 6, 6, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)

    def one_step():
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        sched.step()

    for _ in range(2):
        one_step()
    compiles = counters["stats"]["unique_graphs"]
    for _ in range(6):
        one_step()
    assert counters["stats"]["unique_graphs"] == compiles
    assert opt.param_groups[0]["lr"] < 1e-2 / 7


def test_step_counts_that_diverge_and_meet_again_resume_the_fused_kernel():
    """The fused path remembers the bucket's step count instead of reading it from the device
    every step; when the eager path changed the counts (a param missed a step, then the other
    did), it must notice and use the true count again."""
    torch.manual_seed(0)
    master = [torch.randn(5, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    grads = [[torch.randn_like(m) for m in master] for _ in range(8)]
    missing = {2: 1, 3: 0}                     # step -> index of the param without a gradient

    def run(fused):
        params = [torch.nn.Parameter(m.clone()) for m in master]
        opt = of.AdaBelief(params, lr=1e-2, betas=(0.9, 0.9), fused=fused)
        for k, gs in enumerate(grads):
            for i, (p, g) in enumerate(zip(params, gs)):
                p.grad = None if missing.get(k) == i else g.clone()
            opt.step()
        return params, opt

    fused, opt = run(True)
    eager, _ = run(False)
    assert [opt.state[p]["step"].item() for p in fused] == [7, 7]
    assert opt._flat_buckets and next(iter(opt._flat_buckets.values())).uniform_step() == 7
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def eager_and_fused(cls, start, set_grads, steps=4):
    """The params and optimizer of an eager and a fused run from ``start``, where
    ``set_grads(params, generator)`` gives each step's gradients (the same in both runs)."""
    runs = []
    for fused in (False, True):
        ps = [torch.nn.Parameter(x.clone()) for x in start]
        opt = cls(ps, lr=0.1, fused=fused)
        g = torch.Generator().manual_seed(1)
        for _ in range(steps):
            set_grads(ps, g)
            opt.step()
        runs.append((ps, opt))
    return runs


@pytest.mark.parametrize("in_place", [None, 4, 1], ids=["copied", "mixed", "all-in-place"])
def test_gradients_of_interleaved_shapes_reach_their_params(in_place, monkeypatch):
    """The flat buffers group tensors by shape (one gradient copy per shape), and large ones
    stay out of them: with shapes interleaved, each parameter still gets its own gradient, as
    on the eager path."""
    if in_place is not None:
        monkeypatch.setitem(fused_module.READ_IN_PLACE, "cpu", in_place)
    shapes = [(3, 4), (4,), (3, 4), (), (4,), (3, 4), (2, 1, 2)]
    torch.manual_seed(0)
    start = [torch.randn(s, dtype=torch.float64) for s in shapes]

    def set_grads(ps, g):
        for p in ps:
            p.grad = torch.randn(p.shape, dtype=p.dtype, generator=g)

    (eager, _), (fused, _) = eager_and_fused(of.Lion, start, set_grads)
    assert all(torch.equal(a, b) for a, b in zip(eager, fused))


def test_large_gradient_that_is_not_contiguous_is_read_in_order(monkeypatch):
    """A gradient read in place that is not contiguous (here: transposed strides, as a user
    may assign) is read in its logical order, as the eager path reads it."""
    monkeypatch.setitem(fused_module.READ_IN_PLACE, "cpu", 10)
    torch.manual_seed(0)
    start = [torch.randn(4, 6, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]

    def set_grads(ps, g):
        ps[0].grad = torch.randn(6, 4, dtype=torch.float64, generator=g).t()
        ps[1].grad = torch.randn(3, dtype=torch.float64, generator=g)
        assert not ps[0].grad.is_contiguous()

    (eager, _), (fused, opt) = eager_and_fused(of.AdaBelief, start, set_grads)
    assert len(next(iter(opt._flat_buckets.values())).pieces) == 2      # the matrix on its own
    for a, b in zip(eager, fused):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_large_param_state_not_laid_out_as_the_param_is_read_as_the_eager_path_reads_it(monkeypatch):
    """A large param's state entry of another layout (here: transposed strides, set by hand)
    is made contiguous for the kernel: the same trajectory as eager."""
    monkeypatch.setitem(fused_module.READ_IN_PLACE, "cpu", 10)
    torch.manual_seed(0)
    start, grads = torch.randn(4, 6, dtype=torch.float64), torch.randn(5, 4, 6, dtype=torch.float64)
    runs = []
    for fused in (False, True):
        p = torch.nn.Parameter(start.clone())
        opt = of.AdaBelief([p], lr=0.1, fused=fused)
        p.grad = grads[0]
        opt.step()
        opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"].t().contiguous().t()
        assert not opt.state[p]["exp_avg"].is_contiguous()
        for g in grads[1:]:
            p.grad = g
            opt.step()
        runs.append((p, opt.state[p]["exp_avg"]))
    (pa, ma), (pb, mb) = runs
    torch.testing.assert_close(pa, pb, rtol=1e-12, atol=0)
    torch.testing.assert_close(ma, mb, rtol=1e-12, atol=0)


def test_generated_kernel_is_parallel_whatever_size_it_was_first_compiled_for():
    """Inductor chooses a serial CPU loop for the sizes a kernel is first compiled for when
    they are small, and its caches (in memory and on disk) then hand that kernel to every
    later bucket, however large: a generated kernel first compiled for a tiny bucket must
    still run its loop on all of torch's threads."""
    from unittest import mock

    from torch._inductor.graph import GraphLowering
    from torch._inductor.utils import fresh_cache

    class FirstCompiledSmall(of.Lion):    # its own compiled entry, compiled here
        pass

    codes: list[str] = []
    p = torch.nn.Parameter(torch.randn(8))
    p.grad = torch.randn(8)
    with fresh_cache(), mock.patch.object(GraphLowering, "save_output_code", codes.append):
        FirstCompiledSmall([p], lr=1e-3, fused=True).step()
    kernels = [code for code in codes if "cpp_fused" in code]
    assert kernels, "no generated kernel was compiled"
    assert all("#pragma omp parallel" in code for code in kernels)
