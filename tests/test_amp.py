"""torch.amp.GradScaler with optforge's optimizers: the fast path of torch's fused kernels (the
scale and the inf flag handed to the step, no host read of the flag), and the standard path
wherever a step does not run those kernels."""

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
    opt = make(m.parameters())
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
    "adam": (lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True), lambda ps: of.Adam(ps, lr=1e-2)),
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
              lambda ps: of.AdamW(ps, lr=1e-2, weight_decay=0.1)),
    "amsgrad": (lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True, fused=True),
                lambda ps: of.AMSGrad(ps, lr=1e-2)),
    "sgd": (lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True, fused=True),
            lambda ps: of.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True)),
    "adagrad": (lambda ps: torch.optim.Adagrad(ps, lr=0.1, fused=True), lambda ps: of.Adagrad(ps, lr=0.1)),
}


@pytest.mark.parametrize("unscale_first", [False, True], ids=["scaled", "unscaled-by-user"])
@pytest.mark.parametrize("name", NATIVE)
def test_fast_path_follows_torchs_fused_optimizer(name, unscale_first):
    """The default step takes GradScaler's scale and inf flag into torch's fused kernel, as
    torch's fused optimizer does: the same trajectory, scale and step counts bit for bit, the
    steps with an inf skipped (their counts not advanced)."""
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
    "eager": (lambda ps: of.Adam(ps, lr=1e-2, fused=False), None),
    "a non-contiguous tensor": (lambda ps: of.AdamW(ps, lr=1e-2), _non_contiguous),
    "decay torch's kernel lacks": (lambda ps: of.Adam(ps, lr=1e-2, weight_decay=0.1,
                                                      weight_decay_mode="absolute"), None),
}


@pytest.mark.parametrize("unscale_first", [False, True], ids=["scaled", "unscaled-by-user"])
@pytest.mark.parametrize("case", STANDARD)
def test_steps_without_torchs_kernel_take_the_standard_path(case, unscale_first, monkeypatch):
    """Where a bucket does not run torch's fused kernel, the step unscales and skips as
    GradScaler does for any other optimizer: bit for bit the run without the fast path."""
    make, layout = STANDARD[case]
    handed = train(make, unscale_first, layout)[0]
    monkeypatch.setattr(of.Optimizer, "_step_supports_amp_scaling", False)
    standard = train(make, unscale_first, layout)[0]
    assert_same_run(handed, standard)


class OwnFusedUpdate(of.Adam):
    """A subclass written before the scale and the flag were handed to ``fused_update``."""

    def fused_update(self, group, p, g, s, steps):
        super().fused_update(group, p, g, s, steps)


def test_optimizers_without_the_fast_path_keep_the_standard_path():
    assert of.Adam(model().parameters())._step_supports_amp_scaling
    assert not of.Lion(model().parameters())._step_supports_amp_scaling
    assert not OwnFusedUpdate(model().parameters())._step_supports_amp_scaling
    a = train(lambda ps: OwnFusedUpdate(ps, lr=1e-2))[0]
    b = train(lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True))[0]
    for (pa, sa), (pb, sb) in zip(a, b):      # the standard path unscales before torch's kernel
        assert sa == sb
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7)


def test_fp16_gradients_are_refused_as_the_standard_path_refuses_them():
    m = model(torch.float16)
    opt = of.Adam(m.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(m(torch.randn(4, 6, dtype=torch.float16)).float().sum()).backward()
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        scaler.step(opt)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))
