"""torch.amp.GradScaler with optforge's optimizers: built with ``fused=True``, as torch's, the
fast path of torch's fused kernels (the scale and the inf flag handed to the step, no host read
of the flag), and the standard path wherever a step does not run those kernels; by default the
standard path, as torch's default optimizers."""

import pytest
import torch

import optforge as of

STEPS = 12
INF_AT = (3, 4, 9)            # steps whose gradient holds an inf: skipped, the scale backs off


def model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(dtype)


def train(make, unscale_first=False, layout=None):
    """Params, shared state and the scale after each step under a GradScaler."""
    m = model()
    if layout is not None:
        layout(m)
    opt = make(m)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    gen = torch.Generator().manual_seed(1)
    out = []
    for k in range(STEPS):
        x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 1, generator=gen)
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
        if k in INF_AT:
            m[0].weight.grad[0, 0] = float("inf")
        if unscale_first:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        out.append((torch.cat([p.detach().flatten() for p in m.parameters()]).clone(), scaler.get_scale()))
    return out, opt


def assert_same_run(a, b):
    for step, ((pa, sa), (pb, sb)) in enumerate(zip(a, b), start=1):
        assert sa == sb, f"step {step}: scale {sa} != {sb}"
        assert torch.equal(pa, pb), f"step {step}: max diff {(pa - pb).abs().max().item():.3g}"


NATIVE = {
    "adam": (lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, fused=True),
             lambda m: of.Adam(m.parameters(), lr=1e-2, fused=True)),
    "adamw": (lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, fused=True),
              lambda m: of.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, fused=True)),
    "amsgrad": (lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, amsgrad=True, fused=True),
                lambda m: of.AMSGrad(m.parameters(), lr=1e-2, fused=True)),
    "sgd": (lambda m: torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9, nesterov=True, fused=True),
            lambda m: of.SGD(m.parameters(), lr=1e-2, momentum=0.9, nesterov=True, fused=True)),
    "adagrad": (lambda m: torch.optim.Adagrad(m.parameters(), lr=0.1, fused=True),
                lambda m: of.Adagrad(m.parameters(), lr=0.1, fused=True)),
}


@pytest.mark.parametrize("unscale_first", [False, True], ids=["scaled", "unscaled-by-user"])
@pytest.mark.parametrize("name", NATIVE)
def test_fast_path_follows_torchs_fused_optimizer(name, unscale_first):
    """Built with fused=True, the step takes GradScaler's scale and inf flag into torch's fused
    kernel, as torch's fused optimizer does: the same trajectory, scale and step counts bit for
    bit, the steps with an inf skipped (their counts not advanced)."""
    theirs, ours = NATIVE[name]
    a, torch_opt = train(theirs, unscale_first)
    b, opt = train(ours, unscale_first)
    assert opt._step_supports_amp_scaling
    assert_same_run(a, b)
    for p_theirs, p_ours in zip(torch_opt.state, opt.state):
        for key, value in torch_opt.state[p_theirs].items():
            assert torch.equal(value, opt.state[p_ours][key]), key
        assert opt.state[p_ours]["step"].item() == STEPS - len(INF_AT)


def _non_contiguous(m):
    m[0].weight.data = m[0].weight.data.t().contiguous().t()


STANDARD = {
    "a non-contiguous tensor": (lambda m: of.AdamW(m.parameters(), lr=1e-2, fused=True), _non_contiguous),
    "a group without fused": (lambda m: of.Adam([{"params": m[0].parameters()},
                                                 {"params": m[2].parameters(), "fused": False}],
                                                lr=1e-2, fused=True), None),
}


@pytest.mark.parametrize("unscale_first", [False, True], ids=["scaled", "unscaled-by-user"])
@pytest.mark.parametrize("case", STANDARD)
def test_steps_without_torchs_kernel_take_the_standard_path(case, unscale_first, monkeypatch):
    """Where a bucket of a fused=True optimizer does not run torch's fused kernel, the step
    unscales and skips as GradScaler does for any other optimizer: bit for bit the run without
    the fast path."""
    make, layout = STANDARD[case]
    handed = train(make, unscale_first, layout)[0]
    monkeypatch.setattr(of.Optimizer, "_step_supports_amp_scaling", False)
    standard = train(make, unscale_first, layout)[0]
    assert_same_run(handed, standard)


class OwnFusedUpdate(of.Adam):
    """A subclass written before the scale and the flag were handed to ``fused_update``."""

    def fused_update(self, group, p, g, s, steps):
        super().fused_update(group, p, g, s, steps)


def test_the_fast_path_is_taken_only_where_torchs_would_be():
    """As torch's optimizers: fused=True with torch's kernels. Not by default, where trainers
    that clip gradients under AMP (Lightning refuses to, for optimizers that unscale
    internally) must keep working; nor without torch's kernels, nor for a subclass whose
    fused_update does not take the scale and the flag (it keeps working as before)."""
    params = list(model().parameters())
    assert of.Adam(params, fused=True)._step_supports_amp_scaling
    assert not of.Adam(params)._step_supports_amp_scaling
    assert not of.AdamW(params, fused=False)._step_supports_amp_scaling
    assert not of.Lion(params, fused=True)._step_supports_amp_scaling
    assert not OwnFusedUpdate(params, fused=True)._step_supports_amp_scaling
    a = train(lambda m: OwnFusedUpdate(m.parameters(), lr=1e-2, fused=True))[0]
    b = train(lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, fused=True))[0]
    for (pa, sa), (pb, sb) in zip(a, b):      # the standard path unscales before torch's kernel
        assert sa == sb
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7)


def test_float16_parameters_as_torchs_fused_optimizer_and_the_standard_path():
    """float16 parameters: torch's fused kernel takes them on the fast path, as torch's fused
    optimizer does; the standard path (here for a non-contiguous tensor) refuses float16
    gradients as GradScaler does, with nothing changed."""
    def run(make, layout=None):
        m = model(torch.float16)
        if layout is not None:
            layout(m)
        opt, scaler = make(m.parameters()), torch.amp.GradScaler("cpu", init_scale=2.0**4)
        for k in range(4):
            opt.zero_grad()
            scaler.scale(m(torch.ones(4, 6, dtype=torch.float16) * k).float().sum()).backward()
            scaler.step(opt)
            scaler.update()
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    ours = run(lambda ps: of.Adam(ps, lr=1e-2, fused=True))
    assert torch.equal(ours, run(lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True)))
    assert not torch.equal(ours, run(lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True)))
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        run(lambda ps: of.Adam(ps, lr=1e-2, fused=True), _non_contiguous)
    m = model(torch.float16)
    _non_contiguous(m)
    opt, scaler = of.Adam(m.parameters(), lr=1e-2, fused=True), torch.amp.GradScaler("cpu")
    scaler.scale(m(torch.ones(4, 6, dtype=torch.float16)).float().sum()).backward()
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        scaler.step(opt)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))
    assert not opt.state
