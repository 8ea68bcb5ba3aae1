"""Float64 parity of MARS-AdamW with a per-tensor reference written from the paper's
Algorithm 1 (Yuan et al., "MARS: Unleashing the Power of Variance Reduction for Training Large
Models", arXiv:2411.10438; AdamW preconditioner, approximate gradient difference, as the
official AGI-Arena/MARS ``update_fn`` computes it), and with timm's ``Mars``
(``timm/optim/mars.py``, loaded without importing timm, which needs torchvision).

Both follow the paper's ``x_1 = x_0`` (no gradient difference on step 1) and treat tensors with
``ndim >= 2`` as matrices; see the ``MARS`` docstring for where the official code differs."""

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


class RefMARS(torch.optim.Optimizer):
    """One tensor at a time, no optforge code."""

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


# gamma large enough, and lr small enough vs the model, that both clipped and unclipped steps occur
CASES = [
    dict(),
    dict(optimize_1d=True),
    dict(betas=(0.9, 0.95), gamma=0.1),
    dict(betas=(0.9, 0.95), gamma=0.5, optimize_1d=True, eps=1e-6),
]


def _compare(ref_cls, kwargs, weight_decay, lr=1e-2, **extra):
    model_a, model_b = make_model(), make_model()
    a = trajectory(model_a, of.MARS(two_groups(model_a, lr, weight_decay), **kwargs, **extra))
    b = trajectory(model_b, ref_cls(two_groups(model_b, lr, weight_decay), **kwargs))
    assert_moves(a)
    assert_same_trajectory(a, b)
    return a


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("kwargs", CASES, ids=repr)
def test_mars_matches_reference(kwargs, weight_decay):
    _compare(RefMARS, kwargs, weight_decay)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("kwargs", CASES, ids=repr)
def test_mars_matches_timm(kwargs, weight_decay):
    # timm's default betas differ from the reference's
    _compare(timm_optimizer("mars", "Mars"), {"betas": (0.95, 0.99), **kwargs}, weight_decay)


def test_mars_clip_is_exercised():
    """The parity cases run both branches of the clip: some c_t have norm > 1, some < 1."""
    model = make_model()
    opt = of.MARS(model.parameters(), lr=1e-2, betas=(0.9, 0.95), gamma=0.1)
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


def test_mars_refuses_fused():
    with pytest.raises(ValueError, match="fused"):
        of.MARS(make_model().parameters(), fused=True)
