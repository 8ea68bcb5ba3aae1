"""Every schedule against its closed form (written out independently here), state_dict round
trips mid-run, lr_scale, chaining with torch's schedulers, and create_scheduler by name."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch.optim import lr_scheduler as tls

import optforge as of
from optforge import schedules

BASE = 0.1
STEPS = 30


def _optimizer(kind: str = "torch", scale: float = 0.25) -> torch.optim.Optimizer:
    """Two groups: base lr BASE, and a layer-decayed one (lr_scale baked in, as the factory does)."""
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(2))
    groups = [{"params": [a]}, {"params": [b], "lr": BASE * scale, "lr_scale": scale}]
    cls = torch.optim.SGD if kind == "torch" else of.SGD
    return cls(groups, lr=BASE)


def _run(opt, sched, steps: int = STEPS) -> list[list[float]]:
    """The lrs used by each of `steps` optimizer steps."""
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


# ---- closed forms, written independently of the implementation ------------------------------
def linear_warmup_ref(t, b, s, W, f0=0.0):
    return b * (f0 + (1 - f0) * t / W) if t < W else b


def warmup_cosine_ref(t, b, s, W, T, min_lr=None, min_ratio=0.0, f0=0.0):
    floor = min_lr * s if min_lr is not None else b * min_ratio
    if t < W:
        return b * (f0 + (1 - f0) * t / W)
    if t >= T:
        return floor
    return floor + (b - floor) * (1 + math.cos(math.pi * (t - W) / (T - W))) / 2


def noam_ref(t, b, s, d, W):
    step = t + 1
    return b / math.sqrt(d) * min(1 / math.sqrt(step), step / W**1.5)


def wsd_ref(t, b, s, W, T, D, shape, min_lr=None, min_ratio=0.0):
    floor = min_lr * s if min_lr is not None else b * min_ratio
    if t < W:
        return b * t / W
    if t < T - D:
        return b
    if t >= T:
        return floor
    p = (t - T + D) / D
    phi = {"linear": 1 - p, "cosine": (1 + math.cos(math.pi * p)) / 2, "1-sqrt": 1 - p**0.5}[shape]
    return floor + (b - floor) * phi


CASES = {
    "linear_warmup": (lambda o: schedules.linear_warmup(o, warmup_steps=8),
                      lambda t, b, s: linear_warmup_ref(t, b, s, 8)),
    "linear_warmup_f0": (lambda o: schedules.linear_warmup(o, 5, start_factor=0.2),
                         lambda t, b, s: linear_warmup_ref(t, b, s, 5, 0.2)),
    "warmup_cosine": (lambda o: schedules.warmup_cosine(o, warmup_steps=5, total_steps=25),
                      lambda t, b, s: warmup_cosine_ref(t, b, s, 5, 25)),
    "warmup_cosine_ratio": (lambda o: schedules.warmup_cosine(o, 4, 20, min_ratio=0.1, start_factor=0.5),
                            lambda t, b, s: warmup_cosine_ref(t, b, s, 4, 20, min_ratio=0.1, f0=0.5)),
    "cosine_min_lr": (lambda o: schedules.warmup_cosine(o, 0, 22, min_lr=0.01),
                      lambda t, b, s: warmup_cosine_ref(t, b, s, 0, 22, min_lr=0.01)),
    "noam": (lambda o: schedules.noam(o, d_model=16, warmup_steps=6),
             lambda t, b, s: noam_ref(t, b, s, 16, 6)),
    "wsd_linear": (lambda o: schedules.wsd(o, warmup_steps=4, total_steps=24, decay_steps=8),
                   lambda t, b, s: wsd_ref(t, b, s, 4, 24, 8, "linear")),
    "wsd_cosine": (lambda o: schedules.wsd(o, 3, 20, decay_fraction=0.25, decay_shape="cosine", min_lr=0.02),
                   lambda t, b, s: wsd_ref(t, b, s, 3, 20, 5, "cosine", min_lr=0.02)),
    "wsd_1-sqrt": (lambda o: schedules.wsd(o, 2, 25, decay_shape="1-sqrt", min_ratio=0.05),
                   lambda t, b, s: wsd_ref(t, b, s, 2, 25, 5, "1-sqrt", min_ratio=0.05)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", ["torch", "optforge"])
def test_lr_sequence_matches_closed_form(case, kind):
    make, ref = CASES[case]
    opt = _optimizer(kind)
    sched = make(opt)
    assert isinstance(sched, tls.LRScheduler)
    got = _run(opt, sched)
    for t, (lr0, lr1) in enumerate(got):
        assert lr0 == pytest.approx(ref(t, BASE, 1.0), rel=1e-12, abs=1e-15), (case, t)
        # lr_scale: the second group follows 0.25 x the same schedule (min_lr included)
        assert lr1 == pytest.approx(ref(t, BASE * 0.25, 0.25), rel=1e-12, abs=1e-15), (case, t)
        assert lr1 == pytest.approx(0.25 * lr0, rel=1e-12, abs=1e-15), (case, t)
    assert len({round(x[0], 12) for x in got}) > 3          # the schedule actually moves


@pytest.mark.parametrize("case", list(CASES))
def test_state_dict_round_trip_mid_run(case):
    make, _ = CASES[case]
    opt = _optimizer()
    sched = make(opt)
    expected = _run(opt, sched)

    opt = _optimizer()
    sched = make(opt)
    first = _run(opt, sched, 11)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)

    opt2 = _optimizer()
    sched2 = make(opt2)                                     # scheduler first, then load (torch's order)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert sched2.last_epoch == 11
    assert first + _run(opt2, sched2, STEPS - 11) == expected   # bit for bit


def test_noam_schedule_reproduces_noam_optimizer():
    torch.manual_seed(0)
    w0 = torch.randn(5, 3)
    grads = [torch.randn(5, 3) for _ in range(12)]
    a = torch.nn.Parameter(w0.clone())
    b = torch.nn.Parameter(w0.clone())
    adam = of.Adam([a], lr=1.0, eps=1e-16)
    sched = schedules.noam(adam, d_model=32, warmup_steps=5)
    noam = of.Noam([b], lr=1.0, d_model=32, warmup=5)
    for g in grads:
        a.grad, b.grad = g.clone(), g.clone()
        adam.step()
        sched.step()
        noam.step()
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(a, w0)


def test_chains_with_torch_schedulers():
    # Multiplicative chaining: warmup-cosine times ExponentialLR.
    opt = _optimizer()
    chained = tls.ChainedScheduler([schedules.warmup_cosine(opt, 3, 20), tls.ExponentialLR(opt, 0.9)])
    for t, (lr0, lr1) in enumerate(_run(opt, chained, 25)):
        expect = warmup_cosine_ref(t, BASE, 1.0, 3, 20) * 0.9**t
        assert lr0 == pytest.approx(expect, rel=1e-12, abs=1e-15), t
        assert lr1 == pytest.approx(0.25 * expect, rel=1e-12, abs=1e-15), t

    # Sequential: our warmup, then torch's cosine, then our WSD tail.
    opt = _optimizer()
    seq = tls.SequentialLR(opt, [schedules.linear_warmup(opt, 4), tls.CosineAnnealingLR(opt, T_max=6),
                                 schedules.wsd(opt, 0, 8, decay_steps=4)], milestones=[4, 10])
    got = [x[0] for x in _run(opt, seq, 20)]
    expect = ([linear_warmup_ref(t, BASE, 1, 4) for t in range(4)]
              + [BASE * (1 + math.cos(math.pi * t / 6)) / 2 for t in range(6)]
              + [wsd_ref(t, BASE, 1, 0, 8, 4, "linear") for t in range(10)])
    assert got == pytest.approx(expect, rel=1e-12, abs=1e-15)


def test_set_lr_applies_the_scale():
    opt = _optimizer(scale=0.5)
    of.set_lr(opt, 0.3)
    assert [g["lr"] for g in opt.param_groups] == [0.3, 0.15]


# ---- create_scheduler --------------------------------------------------------------------------
@pytest.mark.parametrize("name,kwargs,cls", [
    ("warmup_cosine", dict(warmup_steps=2, total_steps=10), schedules.WarmupCosineLR),
    ("WarmupCosineLR", dict(warmup_steps=2, total_steps=10), schedules.WarmupCosineLR),
    ("linear-warmup", dict(warmup_steps=2), schedules.LinearWarmupLR),
    ("noam", dict(d_model=8), schedules.NoamLR),
    ("WSD", dict(warmup_steps=1, total_steps=10), schedules.WarmupStableDecayLR),
    ("StepLR", dict(step_size=3), tls.StepLR),
    ("step_lr", dict(step_size=3, gamma=0.5), tls.StepLR),
    ("lambdalr", dict(lr_lambda=lambda t: 0.5**t), tls.LambdaLR),
    ("CosineAnnealingLR", dict(T_max=10), tls.CosineAnnealingLR),
    ("exponentiallr", dict(gamma=0.9), tls.ExponentialLR),
    ("MultiStepLR", dict(milestones=[2, 4]), tls.MultiStepLR),
    ("reduce_lr_on_plateau", dict(patience=1), tls.ReduceLROnPlateau),
])
def test_create_scheduler_by_name(name, kwargs, cls):
    sched = of.create_scheduler(_optimizer(), name, **kwargs)
    assert type(sched) is cls


def test_create_scheduler_lambda_matches_torch():
    opt = _optimizer()
    got = _run(opt, of.create_scheduler(opt, "LambdaLR", lr_lambda=lambda t: 0.9**t), 6)
    assert [x[0] for x in got] == pytest.approx([BASE * 0.9**t for t in range(6)], rel=1e-12)


def test_create_scheduler_scales_absolute_torch_lrs():
    opt = _optimizer(scale=0.5)
    sched = of.create_scheduler(opt, "OneCycleLR", max_lr=1.0, total_steps=10)
    peak = max(_run(opt, sched, 10), key=lambda x: x[0])
    assert peak[1] == pytest.approx(0.5 * peak[0], rel=1e-12)


def test_create_scheduler_errors():
    opt = _optimizer()
    with pytest.raises(ValueError, match=r"unknown scheduler 'warmup_cosin'.*'warmup_cosine'"):
        of.create_scheduler(opt, "warmup_cosin", warmup_steps=1, total_steps=5)
    with pytest.raises(ValueError, match=r"'total_step' \(did you mean 'total_steps'\?\)"):
        of.create_scheduler(opt, "warmup_cosine", warmup_steps=1, total_step=5)
    with pytest.raises(ValueError, match="step_sz"):
        of.create_scheduler(opt, "StepLR", step_sz=3)


@pytest.mark.parametrize("make,match", [
    (lambda o: schedules.warmup_cosine(o, 10, 5), "total_steps"),
    (lambda o: schedules.warmup_cosine(o, 1, 5, min_lr=0.1, min_ratio=0.1), "not both"),
    (lambda o: schedules.wsd(o, 1, 10, decay_shape="sqrt"), "decay_shape"),
    (lambda o: schedules.wsd(o, 6, 10, decay_steps=5), "exceed total_steps"),
    (lambda o: schedules.linear_warmup(o, -1), "warmup_steps"),
    (lambda o: schedules.noam(o, d_model=0), "d_model"),
])
def test_invalid_schedule_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make(_optimizer())
