"""Float64 parity of LAMB with a per-tensor reference written here from the paper's algorithm
box: You et al., 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76
minutes", Algorithm 2 (LAMB), with the weight-norm clamp phi(z) = min(z, clamp_value) of the
reference implementations (cybertronai/pytorch-lamb, torch-optimizer's Lamb)."""

import math

import pytest
import torch

import optforge as of
from helpers import assert_moves, assert_same_trajectory, make_model, trajectory, two_groups


class RefLAMB(torch.optim.Optimizer):
    """One tensor at a time, straight from Algorithm 2; uses no optforge code."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                 clamp_value=10.0, debias=True):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      clamp_value=clamp_value, debias=debias))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            (b1, b2), lr, eps, wd = group["betas"], group["lr"], group["eps"], group["weight_decay"]
            for x in group["params"]:
                if x.grad is None:
                    continue
                g = x.grad
                st = self.state[x]
                if not st:
                    st.update(t=0, m=torch.zeros_like(x), v=torch.zeros_like(x))
                st["t"] += 1
                t = st["t"]
                st["m"] = b1 * st["m"] + (1 - b1) * g
                st["v"] = b2 * st["v"] + (1 - b2) * g * g
                m_hat = st["m"] / (1 - b1**t) if group["debias"] else st["m"]
                v_hat = st["v"] / (1 - b2**t) if group["debias"] else st["v"]
                r = m_hat / (v_hat.sqrt() + eps) + wd * x
                w_norm = min(x.norm().item(), group["clamp_value"])
                r_norm = r.norm().item()
                trust = w_norm / r_norm if w_norm > 0 and r_norm > 0 else 1.0
                x.sub_(lr * trust * r)


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(betas=(0.8, 0.99), eps=1e-8),
    dict(clamp_value=0.3),            # the clamp binds on the larger tensors
    dict(debias=False),
], ids=["defaults", "betas-eps", "clamp", "no-debias"])
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_matches_paper_reference(kwargs, wd):
    model_a, model_b = make_model(), make_model()
    a = trajectory(model_a, of.LAMB(two_groups(model_a, 1e-2, wd), **kwargs))
    b = trajectory(model_b, RefLAMB(two_groups(model_b, 1e-2, wd), **kwargs))
    assert_moves(a)
    assert_same_trajectory(a, b)


def test_zero_norms_give_trust_ratio_one():
    """A zero parameter (||x|| = 0): the step is lr * r, as Adam's."""
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = of.LAMB([p], lr=0.1)
    p.grad = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    opt.step()
    r = p.grad.sign() * (p.grad.abs() / (p.grad.abs() + 1e-6))
    torch.testing.assert_close(p.detach(), -0.1 * r)


def test_fused_is_refused():
    with pytest.raises(ValueError, match="fused"):
        of.LAMB(make_model().parameters(), fused=True)


def test_is_not_elementwise():
    assert not of.get_optimizer_info("lamb").elementwise
    assert math.isfinite(of.get_optimizer_info("lamb").defaults["clamp_value"])
