"""Parameters and param groups, for every registered optimizer on the foreach and the fused
path: zero-size and frozen parameters, groups with different hyperparameters,
add_param_group mid-run, and (eager, elementwise updates) tensors at different step counts.
(Params without grad and add_param_group on the foreach path: tests/test_base.py.)"""

import pytest
import torch
from conformance_cases import (
    INFOS,
    assert_identical,
    flat,
    fused_optimizers,
    make,
    make_model,
    mse,
    optimizer_kwargs,
    run,
    with_paths,
)
from torch import nn

from helpers import READS_CONSTRUCTOR_LR, SCALAR_STATE, batch

WD_MODES = ["coupled", "decoupled", "absolute"]


@pytest.mark.parametrize("info,fused", with_paths())
def test_zero_size_params(info, fused):
    """A (0, 3) weight and a (0,) bias in the bucket: no error, empty state, others step as
    without them. With skip_nonfinite, the empty gradients do not trip the check."""
    model_a, model_b = make_model(), make_model()
    empty = [nn.Parameter(torch.zeros(0, 3, dtype=torch.float64)),
             nn.Parameter(torch.zeros(0, dtype=torch.float64))]
    with_empty = make(info, [*model_a.parameters(), *empty], fused=fused, weight_decay=0.1).configure(
        skip_nonfinite=True)
    without = make(info, model_b.parameters(), fused=fused, weight_decay=0.1)
    x, y = batch()
    a, b = [], []
    for _ in range(6):
        for model, opt, out in ((model_a, with_empty, a), (model_b, without, b)):
            opt.zero_grad()
            loss = mse(model, x, y) + sum(p.sum() for p in empty if model is model_a)
            loss.backward()
            opt.step()
            out.append(flat(model.parameters()))
    assert_identical(a, b)
    assert with_empty.skipped_steps == 0
    for p in empty:
        assert p.grad is not None and p.numel() == 0
        st = with_empty.state[p]
        assert st["step"].item() == 6
        assert all(v.shape == p.shape for k, v in st.items() if k not in SCALAR_STATE)


@pytest.mark.parametrize("info,fused", with_paths())
def test_frozen_params(info, fused):
    """requires_grad=False parameters in the optimizer: never changed (not even decayed), no
    state; the others step exactly as without them, and the fused path stays fused."""
    model_a, model_b = make_model(), make_model()
    frozen_a, frozen_b = model_a[2].weight, model_b[2].weight
    for p in (frozen_a, frozen_b):
        p.requires_grad_(False)
    before = frozen_a.detach().clone()
    for mode in WD_MODES if not fused else ["decoupled"]:   # (each mode is a compile)
        opt_a = make(info, model_a.parameters(), fused=fused, weight_decay=0.1, weight_decay_mode=mode)
        opt_b = make(info, [p for p in model_b.parameters() if p.requires_grad], fused=fused,
                     weight_decay=0.1, weight_decay_mode=mode)
        assert_identical(run(model_a, opt_a, 5), run(model_b, opt_b, 5))
        assert frozen_a.grad is None and torch.equal(frozen_a, before)
        assert not opt_a.state[frozen_a]
        if fused and not opt_a.native_fused(opt_a.param_groups[0]):
            assert opt_a._flat_buckets, "frozen params must not push the fused path to eager"


def other_hyperparameters(info) -> dict:
    """Values other than the table's for every numeric hyperparameter that has a safe
    alternative: lr, betas, momentum, eps, weight decay, weight_decay_mode, maximize."""
    kw = {**info.defaults, **optimizer_kwargs(info.name)}
    out = {"lr": kw["lr"] * 0.5, "weight_decay": 0.07, "weight_decay_mode": "absolute", "maximize": True}
    if "betas" in kw:
        out["betas"] = (kw["betas"][0] * 0.9, *(b * 0.99 for b in kw["betas"][1:]))
    if kw.get("momentum"):
        out["momentum"] = kw["momentum"] * 0.5
    if "eps" in kw:                   # (Adafactor's is torch's pair (eps1, eps2))
        out["eps"] = (1e-5, kw["eps"][1]) if isinstance(kw["eps"], tuple) else 1e-5
    return out


@pytest.mark.parametrize("info,fused", with_paths())
def test_groups_with_different_hyperparameters_are_independent(info, fused):
    """One optimizer with two groups == two optimizers with one group each (bitwise), on
    separable losses; and the second group's hyperparameters do change its path."""
    other = other_hyperparameters(info)
    a1, a2, b1, b2, c2 = (make_model(seed=s) for s in (0, 1, 0, 1, 1))
    both = make(info, [{"params": a1.parameters()}, {"params": a2.parameters(), **other}], fused=fused)
    first = make(info, b1.parameters(), fused=fused)
    if info.name in READS_CONSTRUCTOR_LR:   # the same constructor lr, the other lr as a group's
        second = make(info, [{"params": b2.parameters(), "lr": other["lr"]}], fused=fused,
                      **{k: v for k, v in other.items() if k != "lr"})
    else:
        second = make(info, b2.parameters(), fused=fused, **other)
    table_only = make(info, c2.parameters(), fused=fused)
    x, y = batch()
    sign = -1.0                                   # the second group maximizes: give it -f
    for _ in range(8):
        for opt in (both, first, second, table_only):
            opt.zero_grad()
        (mse(a1, x, y) + sign * mse(a2, x, y)).backward()
        mse(b1, x, y).backward()
        (sign * mse(b2, x, y)).backward()
        (sign * mse(c2, x, y)).backward()
        for opt in (both, first, second, table_only):
            opt.step()
    assert torch.equal(flat(a1.parameters()), flat(b1.parameters()))
    assert torch.equal(flat(a2.parameters()), flat(b2.parameters()))
    assert not torch.equal(flat(a2.parameters()), flat(c2.parameters()))


@pytest.mark.parametrize("info", fused_optimizers())
def test_add_param_group_mid_run_fused(info):
    """The fused path picks up a group added mid-run, and matches the foreach path doing the
    same (to rounding; bitwise where torch's fused kernels serve)."""
    paths = []
    for use_fused in (False, True):
        a, b = make_model(0), make_model(1)
        opt = make(info, a.parameters(), fused=use_fused)
        x, y = batch()
        path = []
        for k in range(10):
            if k == 4:
                lr = optimizer_kwargs(info.name)["lr"] * 2
                opt.add_param_group({"params": list(b.parameters()), "lr": lr})
            opt.zero_grad()
            (mse(a, x, y) + (mse(b, x, y) if k >= 4 else 0)).backward()
            opt.step()
            path.append(torch.cat([flat(a.parameters()), flat(b.parameters())]))
        paths.append(path)
        if use_fused and not opt.native_fused(opt.param_groups[1]):
            assert len(opt._flat_buckets) == 2
        assert opt.state[next(b.parameters())]["step"].item() == 6
    for step, (x, y) in enumerate(zip(*paths), start=1):
        # (rounding, amplified by Compass: its first steps are lr / (1 - 0.99) = 100 lr long)
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-8, msg=lambda m, step=step: f"step {step}: {m}")


ELEMENTWISE = [i for i in INFOS if i.elementwise and i.cls.has_kernel()]


@pytest.mark.parametrize("info", ELEMENTWISE, ids=lambda i: i.name)
def test_params_at_different_step_counts_step_as_if_alone(info):
    """One bucket whose tensors are at different step counts (the kernel gets per-tensor
    scalars: lists) steps each tensor as an optimizer of its own would, bitwise."""
    torch.manual_seed(0)
    together = [nn.Parameter(torch.randn(5, 3, dtype=torch.float64)) for _ in range(3)]
    alone = [nn.Parameter(p.detach().clone()) for p in together]
    opt = make(info, together, fused=False)
    opts = [make(info, [p], fused=False) for p in alone]
    for k in range(8):
        for i, (p, q) in enumerate(zip(together, alone)):
            g = None if k < 2 * i else torch.randn(5, 3, dtype=torch.float64)   # p_i starts at step 2i
            p.grad, q.grad = g, None if g is None else g.clone()
        opt.step()
        for q, o in zip(alone, opts):
            if q.grad is not None:
                o.step()
    assert opt.state[together[0]]["step"].item() == 8 and opt.state[together[2]]["step"].item() == 4
    for p, q in zip(together, alone):
        assert torch.equal(p, q)
