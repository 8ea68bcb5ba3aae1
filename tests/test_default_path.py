"""fused=None, the default: torch's fused kernel where it computes the same update as the
foreach path (SGD without dampening, Adam, AdamW, AMSGrad, Adagrad), the foreach path
otherwise; never a compile, never a change to the parameters' storage or their gradients."""

import copy
from unittest import mock

import pytest
import torch

import optforge as of
from helpers import assert_same_trajectory, make_model, trajectory
from optforge import paths

KERNELS = {"adam": "_fused_adam_", "adamw": "_fused_adamw_", "sgd": "_fused_sgd_",
           "adagrad": "_fused_adagrad_"}


def calls(kernel_name, make_opt, params, steps=3):
    """How often torch's kernel ran in ``steps`` steps of ``make_opt(params)``."""
    opt = make_opt(params)
    with mock.patch.object(torch, kernel_name, wraps=getattr(torch, kernel_name)) as kernel:
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
    return kernel.call_count


def params(dtype=torch.float32):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 3, dtype=dtype)),
            torch.nn.Parameter(torch.randn(3, dtype=dtype))]


NATIVE = [
    ("adam", lambda ps: of.Adam(ps, lr=0.1, weight_decay=0.1)),
    ("adam", lambda ps: of.AMSGrad(ps, lr=0.1, maximize=True)),
    ("adamw", lambda ps: of.AdamW(ps, lr=0.1)),
    ("sgd", lambda ps: of.SGD(ps, lr=0.1, momentum=0.9, nesterov=True)),
    ("sgd", lambda ps: of.SGD(ps, lr=0.1)),
    ("adagrad", lambda ps: of.Adagrad(ps, lr=0.1, lr_decay=0.01, weight_decay=0.1)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel,make_opt", NATIVE)
def test_the_default_runs_torchs_kernel_and_leaves_storage_and_grads_alone(kernel, make_opt, dtype):
    ps = params(dtype)
    opt = make_opt(ps)
    ptrs = [p.data_ptr() for p in ps]
    with mock.patch.object(torch, KERNELS[kernel], wraps=getattr(torch, KERNELS[kernel])) as fused:
        for _ in range(3):
            grads = [torch.randn_like(p) for p in ps]
            for p, g in zip(ps, grads):
                p.grad = g
            kept = [g.clone() for g in grads]
            opt.step()
            assert all(p.grad is g and torch.equal(g, k) for p, g, k in zip(ps, grads, kept))
    assert fused.call_count == 3                 # one call per bucket and step
    assert [p.data_ptr() for p in ps] == ptrs
    assert not getattr(opt, "_flat_buckets", None)
    assert calls(KERNELS[kernel], lambda ps: _forced(make_opt, ps), params(dtype)) == 0


def _forced(make_opt, ps):
    """The same optimizer with fused=False."""
    opt = make_opt(ps)
    for group in opt.param_groups:
        group["fused"] = False
    return opt


class KernelChanged(of.Adam):
    """A subclass whose update differs from Adam's: torch's kernel would not compute it."""

    @staticmethod
    def kernel(group, p, g, s, c):
        of.Adam.kernel(group, p, g, s, {**c, "step": 2 * c["step"]})


EAGER = [
    ("sgd", lambda ps: of.SGD(ps, lr=0.1, momentum=0.9, dampening=0.5)),   # first step b_1 = g_1
    ("adamw", lambda ps: of.AdamW(ps, lr=0.1, weight_decay_mode="absolute")),
    ("adam", lambda ps: of.AdamWarmup(ps, lr=0.1)),                         # scheduled lr
    ("adam", lambda ps: KernelChanged(ps, lr=0.1)),
    ("adagrad", lambda ps: of.Adagrad(ps, lr=0.1, weight_decay=0.1, weight_decay_mode="decoupled")),
    ("adam", lambda ps: of.Adam(ps, lr=0.1, fused=False)),
    ("adamw", lambda ps: of.AdamW(ps, lr=0.1).configure(state_precision="int8", min_quantized_size=0)),
]


@pytest.mark.parametrize("kernel,make_opt", EAGER)
def test_the_default_runs_eagerly_where_torchs_kernel_computes_something_else(kernel, make_opt):
    assert calls(KERNELS[kernel], make_opt, params()) == 0


def test_low_precision_and_strided_params_run_eagerly():
    assert calls("_fused_adamw_", lambda ps: of.AdamW(ps, lr=0.1), params(torch.bfloat16)) == 0
    strided = [torch.nn.Parameter(torch.randn(4, 3, 2)[..., 0])]
    assert calls("_fused_adamw_", lambda ps: of.AdamW(ps, lr=0.1), strided) == 0


@pytest.mark.parametrize("fused", [None, True])
def test_strided_params_follow_the_foreach_path(fused):
    """torch's fused kernels assume contiguous memory: strided params must not reach them."""
    def model():
        torch.manual_seed(0)
        return [torch.nn.Parameter(torch.randn(5, 4, 2, dtype=torch.float64)[..., 0])]

    def run(ps, opt):
        out = []
        for k in range(20):
            torch.manual_seed(k)
            ps[0].grad = torch.randn(5, 4, 2, dtype=torch.float64)[..., 0]
            opt.step()
            out.append(ps[0].detach().clone())
        return out

    for cls in (of.Adam, of.AdamW, of.SGD, of.Adagrad):
        a, b = model(), model()
        assert_same_trajectory(run(a, cls(a, lr=0.1, fused=fused)), run(b, cls(b, lr=0.1, fused=False)))


def test_sparse_gradients_run_eagerly_by_default():
    def run(fused):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(10, 3, sparse=True).double()
        opt = of.SGD(emb.parameters(), lr=0.1, momentum=0.9, fused=fused)
        return trajectory(emb, opt, steps=5,
                          loss_fn=lambda m, x, y: m(torch.tensor([1, 3, 3])).pow(2).sum())

    assert_same_trajectory(run(None), run(False), rtol=0, atol=0)


def test_complex_params_by_default_match_the_foreach_path():
    def run(fused):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(6, dtype=torch.complex128))
        opt = of.Adam([p], lr=0.1, fused=fused)
        out = []
        for k in range(20):
            p.grad = torch.randn(6, dtype=torch.complex128, generator=torch.Generator().manual_seed(k))
            opt.step()
            out.append(torch.view_as_real(p.detach()).clone())
        return out

    assert_same_trajectory(run(None), run(False))


def test_the_default_loads_the_state_of_the_foreach_path_and_resumes_alike():
    model_a, model_b = make_model(), make_model()
    opt_a = of.AdamW(model_a.parameters(), lr=1e-2, fused=False)
    trajectory(model_a, opt_a, steps=5)
    model_b.load_state_dict(model_a.state_dict())
    opt_b = of.AdamW(model_b.parameters(), lr=1e-2)
    state = copy.deepcopy(opt_a.state_dict())     # as torch.save/load would
    state["param_groups"][0]["fused"] = None
    opt_b.load_state_dict(state)             # torch's fused kernel resumes the foreach path's state
    assert_same_trajectory(trajectory(model_a, opt_a, steps=10), trajectory(model_b, opt_b, steps=10))


@pytest.mark.parametrize("cls,fused,on_accelerator", [
    (of.AdamW, True, True), (of.AdamW, None, True), (of.AdamW, False, False), (of.SGD, None, True),
    (of.Lion, True, False), (of.Lion, None, False), (of.NAdam, True, False), (of.Lion, False, False)])
def test_step_counts_live_where_the_step_reads_them(cls, fused, on_accelerator):
    """On an accelerator torch's fused kernels read the step counts on the device; a generated
    kernel and the eager path read them on the host, where reading a device tensor would wait
    for the device every step. On CPU, fused=True keeps torch's float32 counts."""
    opt = cls(params(), fused=fused)
    group = opt.param_groups[0]
    assert paths.steps_on_device(opt, group, (torch.device("cuda"), torch.float32)) == on_accelerator
    assert paths.steps_on_device(opt, group, (torch.device("cpu"), torch.float32)) == bool(fused)
