"""Float64 parity of optforge's AdEMAMix with a per-tensor reference written here from the
paper's algorithm (Pagliardini, Ablin & Grangier, 2024, "The AdEMAMix Optimizer: Better,
Faster, Older", arXiv:2409.03137, Algorithm 1, with the alpha and beta3 warmup schedulers of
the authors' code, github.com/apple/ml-ademamix), over 50 steps with two param groups, eager
and fused."""

import math

import pytest
import torch

import optforge as of
from helpers import assert_moves, assert_same_trajectory, make_model, trajectory, two_groups


def ref_alpha(t, alpha, warmup):
    """alpha_t = alpha * min(t / T_alpha, 1)."""
    return alpha if warmup is None or t >= warmup else t / warmup * alpha


def ref_beta3(t, beta1, beta3, warmup):
    """Linear in half-life: f(b) = ln(0.5) / ln(b) - 1 from f(beta1) to f(beta3) over T_beta3."""
    if warmup is None or t >= warmup:
        return beta3

    def f(b):   # the authors' 1e-8, dropped where it would make log(b + 1e-8) >= 0
        return math.log(0.5) / math.log(b + 1e-8 if b + 1e-8 < 1 else b) - 1

    a = t / warmup
    return 0.5 ** (1 / ((1 - a) * f(beta1) + a * f(beta3) + 1))


class RefAdEMAMix(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=2.0, beta3_warmup=None,
                 alpha_warmup=None, eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, alpha=alpha, beta3_warmup=beta3_warmup,
                                      alpha_warmup=alpha_warmup, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, (b1, b2, b3), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                st = self.state[p]
                if not st:
                    st.update(t=0, m1=torch.zeros_like(p), m2=torch.zeros_like(p), v=torch.zeros_like(p))
                st["t"] += 1
                t = st["t"]
                alpha = ref_alpha(t, group["alpha"], group["alpha_warmup"])
                beta3 = ref_beta3(t, b1, b3, group["beta3_warmup"])
                st["m1"] = b1 * st["m1"] + (1 - b1) * g
                st["m2"] = beta3 * st["m2"] + (1 - beta3) * g
                st["v"] = b2 * st["v"] + (1 - b2) * g * g
                m1_hat = st["m1"] / (1 - b1**t)
                v_hat = st["v"] / (1 - b2**t)
                update = (m1_hat + alpha * st["m2"]) / (v_hat.sqrt() + eps) + wd * p
                p.sub_(lr * update)


CASES = [
    dict(lr=1e-3),                                                     # the reference's defaults
    dict(lr=1e-2, betas=(0.9, 0.999, 0.999), alpha=5.0, weight_decay=0.1),
    dict(lr=1e-2, betas=(0.8, 0.99, 0.999), alpha=8.0, beta3_warmup=30, alpha_warmup=20,
         weight_decay=0.05),
    dict(lr=1e-2, betas=(0.9, 0.99, 0.99999999), beta3_warmup=30),   # beta3 + 1e-8 >= 1
    # beta1 = 0 (the fast EMA is the gradient); at lr=1e-2 this run is chaotic (a 1e-15 change
    # of the initial params moves step 50 by 3e-9 relative in the reference itself): lr=3e-3
    dict(lr=3e-3, betas=(0.0, 0.99, 0.99), alpha=3.0, beta3_warmup=60, alpha_warmup=60),
]


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_ademamix_matches_reference(case, fused):
    case = dict(case)
    lr, wd = case.pop("lr"), case.pop("weight_decay", 0.0)
    model = make_model()
    ref = trajectory(model, RefAdEMAMix(two_groups(model, lr, wd), lr=lr, **case))
    model = make_model()
    traj = trajectory(model, of.AdEMAMix(two_groups(model, lr, wd), lr=lr, fused=fused, **case))
    assert_moves(traj)
    assert_same_trajectory(traj, ref)


def test_warmup_schedules():
    from optforge.optimizers.ademamix import alpha_at, beta3_at

    assert alpha_at(5, 8.0, 10) == pytest.approx(4.0)
    assert alpha_at(10, 8.0, 10) == 8.0 and alpha_at(3, 8.0, None) == 8.0 == alpha_at(3, 8.0, 0)
    assert beta3_at(1e-12, 0.9, 0.9999, 100) == pytest.approx(0.9, rel=1e-6)   # starts at beta1
    assert beta3_at(100, 0.9, 0.9999, 100) == 0.9999
    half_lives = [math.log(0.5) / math.log(beta3_at(t, 0.9, 0.9999, 100)) for t in (10, 20, 30)]
    assert half_lives[2] - half_lives[1] == pytest.approx(half_lives[1] - half_lives[0], rel=1e-4)
