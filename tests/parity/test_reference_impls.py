"""Float64 parity with small reference implementations written here from the equations.

Each reference is a plain per-tensor ``torch.optim.Optimizer`` that uses no optforge code, so a
trajectory match checks optforge's multi-tensor update against the algorithm as written down
(the seed's Compass, the seed's MomentumSGD, labml's AdamWarmup and Noam).
"""

import math

import pytest
import torch

import optforge as of
from helpers import (
    assert_moves,
    assert_same_trajectory,
    batch,
    make_model,
    optimizer_params,
    trajectory,
    two_groups,
)
from optforge.registry import get_optimizer_info

# ---- references --------------------------------------------------------------------------------


class RefCompass(torch.optim.Optimizer):
    """The seed's Compass (LodeW), one tensor at a time, without writing to p.grad. Every
    gradient is centralized over its dims but the first; a 1-D gradient's dims () mean all
    of its entries. ``skip_1d`` is the gradient-centralization paper's rule (dim > 1 only)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), amp_fac=2.0, eps=1e-8, weight_decay=0.0,
                 centralization=0.0, skip_1d=False):
        super().__init__(params, dict(lr=lr, betas=betas, amp_fac=amp_fac, eps=eps,
                                      weight_decay=weight_decay, centralization=centralization))
        self.skip_1d = skip_1d

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
            a, wd, c = group["amp_fac"], group["weight_decay"], group["centralization"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.clone()
                st = self.state[p]
                if not st:
                    st.update(t=0, ema=torch.zeros_like(p), ema_sq=torch.zeros_like(p))
                st["t"] += 1
                t = st["t"]
                if c != 0 and not (self.skip_1d and g.dim() <= 1):      # gradient centralization
                    g = g - c * g.mean(dim=tuple(range(1, g.dim())), keepdim=True)
                st["ema"] = b1 * st["ema"] + (1 - b1) * g         # ema of g
                g2 = g + a * st["ema"]                            # g' = g + amp_fac * ema
                st["ema_sq"] = b2 * st["ema_sq"] + (1 - b2) * g2 * g2
                step_size = lr / (1 - b1**t)
                denom = st["ema_sq"].sqrt() / math.sqrt(1 - b2**t) + eps
                p.mul_(1 - step_size * wd)                        # decoupled decay, seed's scale
                p.sub_(step_size * g2 / denom)


class RefMomentumSGD(torch.optim.Optimizer):
    """dw <- -lr * g + momentum * dw; w <- w + dw (g with coupled L2: g + wd * w)."""

    def __init__(self, params, lr=0.01, momentum=0.9, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad + group["weight_decay"] * p
                st = self.state[p]
                if not st:
                    st["dw"] = torch.zeros_like(p)
                st["dw"] = -group["lr"] * g + group["momentum"] * st["dw"]
                p.add_(st["dw"])


class RefScheduledAdam(torch.optim.Optimizer):
    """Adam with a per-step lr_t and decoupled decay p *= 1 - lr * wd (the group lr)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-16, weight_decay=0.0, amsgrad=False,
                 warmup=0, d_model=512):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad, warmup=warmup, d_model=d_model))

    def lr_t(self, group, t):
        raise NotImplementedError

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            (b1, b2), eps, wd = group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                st = self.state[p]
                if not st:
                    st.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p), vmax=torch.zeros_like(p))
                st["t"] += 1
                t = st["t"]
                st["m"] = b1 * st["m"] + (1 - b1) * g
                st["v"] = b2 * st["v"] + (1 - b2) * g * g
                v = st["v"]
                if group["amsgrad"]:
                    st["vmax"] = torch.maximum(st["vmax"], st["v"])
                    v = st["vmax"]
                p.mul_(1 - group["lr"] * wd)
                p.sub_(self.lr_t(group, t) / (1 - b1**t) * st["m"] / (v.sqrt() / math.sqrt(1 - b2**t) + eps))


class RefAdamWarmup(RefScheduledAdam):
    def lr_t(self, group, t):
        lr, w = group["lr"], group["warmup"]
        return 1e-8 + t * lr / w if t < w else lr


class RefNoam(RefScheduledAdam):
    def lr_t(self, group, t):
        return group["lr"] * group["d_model"] ** -0.5 * min(t**-0.5, t * group["warmup"] ** -1.5)


# ---- trajectories ------------------------------------------------------------------------------


def compare(ours, theirs, kwargs, weight_decay, lr):
    model_a, model_b = make_model(), make_model()
    a = trajectory(model_a, ours(two_groups(model_a, lr, weight_decay), **kwargs))
    b = trajectory(model_b, theirs(two_groups(model_b, lr, weight_decay), **kwargs))
    assert_moves(a)
    assert_same_trajectory(a, b)
    return a


COMPASS_CASES = [
    dict(),
    dict(centralization=1.0),
    dict(centralization=0.5),
    dict(amp_fac=0.0),
    dict(amp_fac=5.0, centralization=1.0),
    dict(betas=(0.99, 0.999)),          # lodestone-rock's original defaults
    dict(betas=(0.9, 0.99), eps=1e-6),
]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("kwargs", COMPASS_CASES, ids=repr)
def test_compass_matches_reference(kwargs, weight_decay):
    # lr = 1e-3 (the default): the seed's step size lr / (1 - beta1^t) is 100 lr at t = 1, so at
    # lr = 1e-2 the first steps move every weight by ~1 and the path turns chaotic, amplifying
    # 1-ulp differences in operation order past rtol 1e-10.
    compare(of.Compass, RefCompass, kwargs, weight_decay, lr=1e-3)


def test_compass_options_matter():
    """Guard against vacuous cases: centralization, amp_fac and decay each change the path."""
    base = compare(of.Compass, RefCompass, {}, 0.0, lr=1e-3)
    for kwargs, wd in [(dict(centralization=1.0), 0.0), (dict(amp_fac=5.0), 0.0), ({}, 0.1)]:
        other = compare(of.Compass, RefCompass, kwargs, wd, lr=1e-3)
        assert (other[-1] - base[-1]).abs().max() > 1e-4, kwargs


def test_compass_can_skip_1d_tensors_as_the_centralization_paper():
    model_a, model_b = make_model(), make_model()
    kw = dict(centralization=1.0)
    a = trajectory(model_a, of.Compass(two_groups(model_a, 1e-3, 0.1), centralize_1d=False, **kw))
    b = trajectory(model_b, RefCompass(two_groups(model_b, 1e-3, 0.1), skip_1d=True, **kw))
    assert_same_trajectory(a, b)
    every = compare(of.Compass, RefCompass, kw, 0.1, lr=1e-3)
    assert (every[-1] - a[-1]).abs().max() > 1e-4      # the model's biases are centralized by default


def test_lodew_is_compass():
    assert of.LodeW is of.Compass
    assert get_optimizer_info("LodeW").cls is of.Compass
    compare(of.LodeW, RefCompass, dict(centralization=1.0), 0.1, lr=1e-3)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("kwargs", [dict(), dict(momentum=0.5), dict(momentum=0.0)], ids=repr)
def test_momentum_sgd_matches_reference(kwargs, weight_decay):
    compare(of.MomentumSGD, RefMomentumSGD, kwargs, weight_decay, lr=0.05)


def test_momentum_sgd_equals_torch_sgd_with_momentum_at_constant_lr():
    model_a, model_b = make_model(), make_model()
    a = trajectory(model_a, of.MomentumSGD(model_a.parameters(), lr=0.05, momentum=0.9))
    b = trajectory(model_b, torch.optim.SGD(model_b.parameters(), lr=0.05, momentum=0.9, foreach=False))
    assert_same_trajectory(a, b)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("kwargs", [dict(warmup=20), dict(warmup=20, amsgrad=True), dict(warmup=0),
                                    dict(warmup=7, betas=(0.8, 0.99), eps=1e-8)], ids=repr)
def test_adam_warmup_matches_reference(kwargs, weight_decay):
    compare(of.AdamWarmup, RefAdamWarmup, kwargs, weight_decay, lr=1e-2)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("kwargs", [dict(lr=1.0, d_model=16, warmup=20),
                                    dict(lr=0.5, d_model=32, warmup=10, amsgrad=True)], ids=repr)
def test_noam_matches_reference(kwargs, weight_decay):
    kwargs = dict(kwargs)
    compare(of.Noam, RefNoam, kwargs, weight_decay, lr=kwargs.pop("lr"))


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


@pytest.mark.parametrize("cls,expected_lr1", [
    (lambda ps: of.AdamWarmup(ps, lr=1e-2, warmup=20), 1e-8 + 1e-2 / 20),
    (lambda ps: of.AdamWarmup(ps, lr=1e-2, warmup=0), 1e-2),
    (lambda ps: of.Noam(ps, lr=1.0, d_model=16, warmup=20), 16**-0.5 * 20**-1.5),
], ids=["warmup20", "warmup0", "noam"])
def test_warmup_scales_the_first_step(cls, expected_lr1):
    """Adam's first step moves each coordinate by lr_1 * g / (|g| + eps) ~ lr_1: the schedule's
    value at t = 1, computed here by hand, bounds the first displacement."""
    model = make_model()
    before = flat(model)
    trajectory(model, cls(model.parameters()), steps=1)
    moved = (flat(model) - before).abs().max().item()
    assert moved == pytest.approx(expected_lr1, rel=1e-6)


def test_warmup_matters_within_50_steps():
    def run(**kw):
        model = make_model()
        return trajectory(model, of.AdamWarmup(two_groups(model, 1e-2, 0.0), **kw))

    warm, cold = run(warmup=20), run(warmup=0)
    assert (warm[-1] - cold[-1]).abs().max() > 1e-3
    # once warm (t >= 20) both take full-lr steps, but the warmed-up run lags behind
    assert (warm[19] - warm[0]).abs().max() < (cold[19] - cold[0]).abs().max()


# ---- the seed's bug: Compass wrote centralization and amplification into p.grad ---------------


@pytest.mark.parametrize("mode", ["coupled", "decoupled", "absolute"])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("cls,kwargs", optimizer_params())
def test_step_leaves_grad_untouched(cls, kwargs, maximize, mode):
    model = make_model()
    kwargs = {**kwargs, "weight_decay": 0.1, "weight_decay_mode": mode, "maximize": maximize}
    if cls is of.Compass:
        kwargs["centralization"] = 1.0
    opt = cls(model.parameters(), **kwargs)
    x, y = batch()
    for _ in range(3):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        for p, g in zip(model.parameters(), grads):
            assert torch.equal(p.grad, g)
            for name, s in opt.state[p].items():
                if torch.is_tensor(s) and s.dim() > 0:
                    assert s.data_ptr() != p.grad.data_ptr(), f"state {name!r} aliases p.grad"
