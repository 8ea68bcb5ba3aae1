"""The three ways a step can run agree, for every registered optimizer: foreach over a
(device, dtype) bucket, one tensor at a time (each parameter in its own param group, so every
bucket holds one tensor), and fused=True (torch's kernels or the generated flat kernel)."""

import pytest
import torch
from conformance_cases import (
    assert_identical,
    couples_group,
    flat,
    fused_optimizers,
    make,
    make_model,
    mse,
    optimizer_kwargs,
    with_paths,
)

import optforge as of
from helpers import batch, two_groups
from optforge import fused as fused_module

DTYPES = [pytest.param(torch.float64, id="f64"), pytest.param(torch.float32, id="f32")]


def steps_with_gaps(model, opt, steps=16, gaps=True):
    """Full-batch steps; with ``gaps``, one parameter goes without a gradient on steps 3-6 (a
    different one each time), so its step count falls behind the others' in its bucket."""
    dtype = next(model.parameters()).dtype
    x, y = (t.to(dtype) for t in batch(dtype=torch.float64))   # the same data in every dtype
    params = list(model.parameters())
    out = []
    for k in range(steps):
        opt.zero_grad()
        mse(model, x, y).backward()
        if gaps and 3 <= k <= 6:
            params[k % len(params)].grad = None
        opt.step()
        out.append(flat(params))
    return out


def reference(info, dtype, groups, gaps):
    """The float64 foreach trajectory that a float32 run approximates (None for float64)."""
    if dtype == torch.float64:
        return None
    model = make_model(dtype=torch.float32).double()
    return steps_with_gaps(model, make(info, groups(model)), gaps=gaps)


def assert_close_paths(a, b, ref=None):
    """``b`` equals ``a`` up to the rounding of another operation order: in float64 to 1e-9;
    in float32 (where an adaptive optimizer amplifies rounding on a hard problem: see Compass)
    ``b`` must be about as close to the float64 trajectory ``ref`` as ``a`` is."""
    if ref is None:
        for step, (x, y) in enumerate(zip(a, b), start=1):
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-10,
                                       msg=lambda m, step=step: f"step {step}: {m}")
        return
    err_a = max((x - r).abs().max().item() for x, r in zip(a, ref))
    err_b = max((y - r).abs().max().item() for y, r in zip(b, ref))
    assert err_b <= 3 * err_a + 1e-6, f"float32 error vs float64: {err_b:.3g}, foreach's {err_a:.3g}"


def one_group(model):
    return model.parameters()


def one_group_each(model):
    return [{"params": [p]} for p in model.parameters()]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("info,fused", with_paths())
def test_bucketed_equals_one_tensor_at_a_time(info, fused, dtype):
    """Bitwise: a tensor's update never depends on which tensors share its bucket, nor on
    their step counts. (Fused: a bucket whose step counts differ runs the eager path while
    one-tensor buckets stay fused, so from the first gap on the two agree to rounding. Muon and
    Shampoo stack same-shape matrices of a bucket's tensors into one batched matmul, whose
    kernel can round by batch size: they agree to rounding.)"""
    if couples_group(info):
        pytest.skip("its update couples the tensors of a group by design (step_group)")
    model_a, model_b = make_model(dtype=dtype), make_model(dtype=dtype)
    bucketed = make(info, one_group(model_a), fused=fused)
    one_by_one = make(info, one_group_each(model_b), fused=fused)
    a, b = steps_with_gaps(model_a, bucketed), steps_with_gaps(model_b, one_by_one)
    assert (a[-1] - a[0]).abs().max() > 1e-4
    if fused:
        assert_identical(a[:3], b[:3])
        assert_close_paths(a, b, reference(info, dtype, one_group, gaps=True))
    elif getattr(info.cls, "stacks_across_tensors", False):    # a batched matmul rounds by batch size
        assert_close_paths(a, b, reference(info, dtype, one_group, gaps=True))
    else:
        assert_identical(a, b)
    steps = [bucketed.state[p]["step"].item() for p in model_a.parameters()]
    assert sorted(set(steps)) == [15, 16]        # the gaps did happen


@pytest.mark.parametrize("read_in_place", [None, 4], ids=["grads-copied", "grads-in-place"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("info", fused_optimizers())
def test_fused_equals_foreach(info, dtype, read_in_place, monkeypatch):
    """Two param groups with other lr and weight decay; the generated kernel copies the
    gradients into its flat buffer (these tensors are small), or reads those of 4 entries and
    more in place (all but two biases, which stay in a flat piece of 4 entries), and never
    writes into them."""
    if read_in_place is not None:
        monkeypatch.setitem(fused_module.READ_IN_PLACE, "cpu", read_in_place)
    lr = optimizer_kwargs(info.name)["lr"]

    def groups(model):
        return two_groups(model, lr, 0.05)

    model_a, model_b = make_model(dtype=dtype), make_model(dtype=dtype)
    foreach, fused = make(info, groups(model_a), fused=False), make(info, groups(model_b), fused=True)
    a = steps_with_gaps(model_a, foreach, gaps=False)
    b = steps_with_gaps(model_b, fused, gaps=False)
    assert (a[-1] - a[0]).abs().max() > 1e-4
    assert_close_paths(a, b, reference(info, dtype, groups, gaps=False))
    if not fused.native_fused(fused.param_groups[0]):         # the flat kernel really ran
        assert fused._flat_buckets
    params = list(model_b.parameters())
    grads = [(p.grad, p.grad._version, p.grad.clone()) for p in params]
    fused.step()
    for p, (g, version, values) in zip(params, grads):
        assert p.grad is g and g._version == version and torch.equal(g, values)


def test_a_sweep_of_fused_configurations_does_not_exhaust_recompiles():
    """Group constants (betas, momentum, flags, weight decay) and the dtype are compile-time
    constants of the generated kernel. They used to share one code object per class, so the
    9th configuration of a class in one process hit dynamo's recompile limit, which with
    fullgraph=True is an error. (The limit is lowered here to keep the test fast.)"""
    with torch._dynamo.config.patch(recompile_limit=2):
        for mode in ("coupled", "decoupled", "absolute"):
            model = make_model()
            opt = of.SGD(model.parameters(), lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.1,
                         weight_decay_mode=mode, fused=True)
            steps_with_gaps(model, opt, steps=2, gaps=False)
            assert opt._flat_buckets                  # dampening: the generated kernel ran
