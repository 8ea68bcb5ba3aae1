"""Float64 parity of MARS-AdamW with per-tensor references written here: the behaviour of the
authors' code (AGI-Arena/MARS ``MARS``, ``mars_type="mars-adamw"``, ``is_approx=True``), which
the default ``variant="official"`` follows, and that of the paper's Algorithm 1 as timm's ``Mars``
computes it (``variant="timm"``), also compared with timm's ``Mars`` itself
(``timm/optim/mars.py``, loaded without importing timm, which needs torchvision).

The model has a 4-D conv kernel, 2-D matrices and 1-D biases: the official code gives the
kernel AdamW (matrices are exactly 2-D), timm gives it the MARS update."""

import math

import pytest
import torch

import optforge as of
from helpers import (
    assert_moves,
    assert_same_trajectory,
    make_model,
    timm_optimizer,
    trajectory,
    two_groups,
)


class RefOfficial(torch.optim.Optimizer):
    """The official code's step, one tensor at a time, no optforge code. As there, lr, betas,
    weight_decay and amsgrad are read per param group; eps, gamma, optimize_1d and the 1-D
    hyperparameters are the constructor's, and the 1-D lr is the group's lr times lr_1d / lr."""

    def __init__(self, params, lr=3e-3, betas=(0.95, 0.99), eps=1e-8, weight_decay=0.0, amsgrad=False,
                 gamma=0.025, optimize_1d=False, lr_1d=3e-3, betas_1d=(0.9, 0.95), weight_decay_1d=0.1):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, amsgrad=amsgrad))
        self.eps, self.gamma, self.optimize_1d = eps, gamma, optimize_1d
        self.lr_1d_ratio, self.betas_1d, self.weight_decay_1d = lr_1d / lr, betas_1d, weight_decay_1d

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.clone()
                st = self.state[p]
                if not st:   # the gradient memory starts at zero: step 1 has c_1 = (1 + k) g_1
                    st.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p),
                              v_max=torch.zeros_like(p), last=torch.zeros_like(p))
                st["t"] += 1
                t = st["t"]
                if self.optimize_1d or g.dim() == 2:       # a matrix: exactly two dims
                    (b1, b2), lr, wd = group["betas"], group["lr"], group["weight_decay"]
                    c = g + self.gamma * b1 / (1 - b1) * (g - st["last"])
                    norm = c.norm()
                    if norm > 1:                           # clip c_t to unit norm
                        c = c / norm
                else:                                      # AdamW with the 1-D hyperparameters
                    (b1, b2), wd = self.betas_1d, self.weight_decay_1d
                    lr = group["lr"] * self.lr_1d_ratio
                    c = g
                st["m"] = b1 * st["m"] + (1 - b1) * c
                st["v"] = b2 * st["v"] + (1 - b2) * c * c
                st["v_max"] = torch.maximum(st["v_max"], st["v"])
                v = st["v_max"] if group["amsgrad"] else st["v"]
                denom = (v.sqrt() / math.sqrt(1 - b2**t) + self.eps) * (1 - b1**t)
                p.add_(-lr * (wd * p + st["m"] / denom))
                st["last"] = g


class RefTimm(torch.optim.Optimizer):
    """The paper's first step and timm's matrix rule (ndim >= 2), one tensor at a time; the
    other tensors get AdamW with the group's hyperparameters."""

    def __init__(self, params, lr=3e-3, betas=(0.95, 0.99), eps=1e-8, weight_decay=0.0, gamma=0.025,
                 optimize_1d=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      gamma=gamma, optimize_1d=optimize_1d))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.clone()
                st = self.state[p]
                if not st:   # x_1 = x_0: no gradient difference on the first step
                    st.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p), last=g.clone())
                st["t"] += 1
                t = st["t"]
                if group["optimize_1d"] or g.dim() >= 2:
                    c = g + group["gamma"] * b1 / (1 - b1) * (g - st["last"])   # c_t
                    norm = c.norm()
                    if norm > 1:                                                 # clip to unit norm
                        c = c / norm
                else:
                    c = g                                                        # AdamW for 1-D
                st["m"] = b1 * st["m"] + (1 - b1) * c
                st["v"] = b2 * st["v"] + (1 - b2) * c * c
                denom = (st["v"].sqrt() / math.sqrt(1 - b2**t) + eps) * (1 - b1**t)
                p.add_(-lr * (wd * p + st["m"] / denom))
                st["last"] = g


class Scheduled:
    """An optimizer and its lr schedule, stepped together (for ``trajectory``)."""

    def __init__(self, opt, lr_lambda):
        self.opt, self.schedule = opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)

    def zero_grad(self):
        self.opt.zero_grad()

    def step(self):
        self.opt.step()
        self.schedule.step()


def case_id(kwargs: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in kwargs.items()).replace(" ", "") or "defaults"


def _same(make_params, ours, reference, wrap=lambda opt: opt):
    """Trajectories of ``of.MARS`` and ``reference`` (both built by ``make_params(model)``)."""
    model_a, model_b = make_model(), make_model()
    a = trajectory(model_a, wrap(ours(make_params(model_a))))
    b = trajectory(model_b, wrap(reference(make_params(model_b))))
    assert_moves(a)
    assert_same_trajectory(a, b)


# ---- variant="official" (the default) --------------------------------------------------------
OFFICIAL_CASES = [
    dict(),                                                                    # every default
    dict(optimize_1d=True),
    dict(lr=1e-2, lr_1d=2e-2, betas_1d=(0.8, 0.9), weight_decay_1d=0.3),
    dict(lr=1e-2, gamma=0.5, betas=(0.9, 0.95)),
    dict(lr=1e-2, weight_decay=0.1),
    dict(lr=1e-2, amsgrad=True),
    dict(lr=1e-2, amsgrad=True, optimize_1d=True, weight_decay=0.1, eps=1e-6),
]


@pytest.mark.parametrize("kwargs", OFFICIAL_CASES, ids=case_id)
def test_official_matches_reference(kwargs):
    _same(lambda m: m.parameters(), lambda ps: of.MARS(ps, **kwargs), lambda ps: RefOfficial(ps, **kwargs))


def test_official_two_groups():
    """Groups with their own lr, weight decay, betas and amsgrad; the 1-D lr is each group's lr
    times lr_1d / (the constructor's lr)."""
    def groups(model):
        big, small = two_groups(model, 1e-2, 0.1)   # conv kernel + matrices; biases
        return [{**big, "betas": (0.9, 0.95)}, {**small, "amsgrad": True}]

    kwargs = dict(lr=4e-3, lr_1d=6e-3, weight_decay_1d=0.2)
    _same(groups, lambda ps: of.MARS(ps, **kwargs), lambda ps: RefOfficial(ps, **kwargs))


def test_official_lr_schedule_scales_lr_1d():
    kwargs = dict(lr=1e-2, lr_1d=4e-3, gamma=0.1)
    decay = lambda step: 1 / (1 + 0.2 * step)                                  # noqa: E731
    _same(lambda m: m.parameters(), lambda ps: of.MARS(ps, **kwargs), lambda ps: RefOfficial(ps, **kwargs),
          wrap=lambda opt: Scheduled(opt, decay))


def test_official_coupled_decay_is_l2_per_tensor_kind():
    """weight_decay_mode="coupled" adds weight_decay * p to the matrices' gradients and
    weight_decay_1d * p to the others': the same path as those L2 terms in the loss."""
    wd, wd_1d = 0.3, 0.7

    def l2_loss(model, x, y):
        l2 = sum((wd if p.dim() == 2 else wd_1d) / 2 * (p**2).sum() for p in model.parameters())
        return ((model(x) - y) ** 2).mean() + l2

    model_a, model_b = make_model(), make_model()
    a = trajectory(model_a, of.MARS(model_a.parameters(), lr=1e-2, weight_decay=wd, weight_decay_1d=wd_1d,
                                    weight_decay_mode="coupled"))
    b = trajectory(model_b, of.MARS(model_b.parameters(), lr=1e-2, weight_decay_1d=0.0), loss_fn=l2_loss)
    assert_moves(a)
    assert_same_trajectory(a, b)


# ---- variant="timm" --------------------------------------------------------------------------
TIMM_CASES = [
    dict(),
    dict(optimize_1d=True),
    dict(betas=(0.9, 0.95), gamma=0.1),
    dict(betas=(0.9, 0.95), gamma=0.5, optimize_1d=True, eps=1e-6),
]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("kwargs", TIMM_CASES, ids=case_id)
def test_timm_variant_matches_reference(kwargs, weight_decay):
    _same(lambda m: two_groups(m, 1e-2, weight_decay), lambda ps: of.MARS(ps, variant="timm", **kwargs),
          lambda ps: RefTimm(ps, **kwargs))


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("kwargs", TIMM_CASES, ids=case_id)
def test_timm_variant_matches_timm(kwargs, weight_decay):
    timm_mars = timm_optimizer("mars", "Mars")
    kwargs = {"betas": (0.95, 0.99), **kwargs}     # timm's default betas differ from the official ones
    _same(lambda m: two_groups(m, 1e-2, weight_decay), lambda ps: of.MARS(ps, variant="timm", **kwargs),
          lambda ps: timm_mars(ps, **kwargs))


# ---- both branches of the clip run -----------------------------------------------------------
@pytest.mark.parametrize("kwargs", [dict(), dict(lr=1e-2, gamma=0.5, betas=(0.9, 0.95)),
                                    dict(variant="timm", lr=1e-2, betas=(0.9, 0.95), gamma=0.1)], ids=case_id)
def test_clip_is_exercised(kwargs):
    """Parity cases run both branches of the clip: some c_t have norm > 1, some < 1."""
    model = make_model()
    opt = of.MARS(model.parameters(), **kwargs)
    seen = set()
    orig = torch._foreach_clamp_min_

    def spy(norms, lo):
        seen.update(bool(n > lo) for n in norms)
        return orig(norms, lo)

    torch._foreach_clamp_min_ = spy
    try:
        trajectory(model, opt, steps=20)
    finally:
        torch._foreach_clamp_min_ = orig
    assert seen == {True, False}


# ---- refused settings ------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,message", [
    (dict(mars_type="mars-lion"), r"mars_type='mars-lion'"),
    (dict(mars_type="mars-shampoo"), r"mars_type='mars-shampoo'"),
    (dict(is_approx=False), r"is_approx=False.*approximate"),
    (dict(variant="paper"), r"variant='paper'"),
    (dict(fused=True), r"fused"),
])
def test_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        of.MARS(make_model().parameters(), **kwargs)


def test_zero_constructor_lr_is_refused_where_lr_1d_needs_it():
    matrix, bias = torch.zeros(3, 2, requires_grad=True), torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"lr=0\.0 .*shape \(3,\)"):
        of.MARS([matrix, bias], lr=0.0)
    of.MARS([matrix], lr=0.0)                              # matrices only: lr_1d is not used
    of.MARS([matrix, bias], lr=0.0, optimize_1d=True)
    of.MARS([matrix, bias], lr=0.0, variant="timm")
    opt = of.MARS([matrix], lr=0.0)
    with pytest.raises(ValueError, match=r"lr=0\.0"):
        opt.add_param_group({"params": [bias], "lr": 1e-3})
    assert len(opt.param_groups) == 1                      # nothing added
