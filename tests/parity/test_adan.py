"""Float64 parity of Adan with a per-tensor reference written from the paper's Algorithm 1
(Xie et al., "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep Models",
arXiv:2208.06677) in the conventions of the authors' code (sail-sg/Adan), and with timm's copy
of that code (``timm/optim/adan.py``, loaded without importing timm, which needs torchvision)."""

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


class RefAdan(torch.optim.Optimizer):
    """One tensor at a time; betas are the moments' decay rates (1 - the paper's betas)."""

    def __init__(self, params, lr=1e-3, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.0,
                 no_prox=False):   # the official signature: three betas
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      no_prox=no_prox))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, (b1, b2, b3), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.clone()
                st = self.state[p]
                if not st:   # g_0 = g_1: no difference on the first step
                    st.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p), n=torch.zeros_like(p),
                              pre=g.clone())
                st["t"] += 1
                t = st["t"]
                diff = g - st["pre"]
                st["m"] = b1 * st["m"] + (1 - b1) * g                      # m_k
                st["v"] = b2 * st["v"] + (1 - b2) * diff                   # v_k
                st["n"] = b3 * st["n"] + (1 - b3) * (g + b2 * diff) ** 2   # n_k
                eta = lr / ((st["n"] / (1 - b3**t)).sqrt() + eps)
                u = st["m"] / (1 - b1**t) + b2 * st["v"] / (1 - b2**t)
                if group["no_prox"]:
                    p.copy_(p * (1 - lr * wd) - eta * u)
                else:
                    p.copy_((p - eta * u) / (1 + lr * wd))                 # proximal decay
                st["pre"] = g


CASES = [   # the reference's kwargs, which optforge takes as they are
    dict(),
    dict(no_prox=True),
    dict(betas=(0.9, 0.8, 0.95)),
    dict(betas=(0.9, 0.8, 0.95), no_prox=True, eps=1e-6),
]


def _compare(ref_cls, kwargs, weight_decay, lr=1e-2, **extra):
    model_a, model_b = make_model(), make_model()
    a = trajectory(model_a, of.Adan(two_groups(model_a, lr, weight_decay), **kwargs, **extra))
    b = trajectory(model_b, ref_cls(two_groups(model_b, lr, weight_decay), **kwargs))
    assert_moves(a)
    assert_same_trajectory(a, b)
    return a


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("kwargs", CASES, ids=repr)
def test_adan_matches_reference(kwargs, weight_decay):
    _compare(RefAdan, kwargs, weight_decay)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("kwargs", CASES, ids=repr)
def test_adan_matches_timm(kwargs, weight_decay):
    _compare(timm_optimizer("adan", "Adan"), kwargs, weight_decay)


def test_adan_no_prox_is_decoupled_decay():
    """no_prox=True is AdamW-style decay; the default divides by 1 + lr wd after the step."""
    _compare(RefAdan, dict(no_prox=True), 0.1)
    model = make_model()
    opt = of.Adan(model.parameters(), lr=0.1, weight_decay=0.5)
    assert math.isclose(opt.decay_lr(opt.param_groups[0], [1.0]) * 0.5, 1 - 1 / 1.05)


@pytest.mark.parametrize("kwargs", [dict(), dict(no_prox=True)], ids=repr)
def test_adan_fused_matches_eager(kwargs):
    pytest.importorskip("torch._inductor")
    _compare(RefAdan, kwargs, 0.1, fused=True)
