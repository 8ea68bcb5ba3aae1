"""Float64 parity of optforge's ADOPT over 50 steps with two param groups, eager and fused:

- with a per-tensor reference written here from the algorithm (Taniguchi et al., 2024, "ADOPT:
  Modified Adam Can Converge with Any beta_2 with the Optimal Rate", arXiv:2411.02853,
  Algorithm 2 with the clipping of the updated version: step 1 only sets v = g^2; then
  m = b1 m + (1 - b1) clip(g / max(sqrt(v), eps), (t-1)^{1/4}), p -= lr m, v = b2 v + (1 - b2) g^2);
- with the authors' package ``torch-adopt`` (github.com/iShohei220/adopt), when installed.
"""

import pytest
import torch

import optforge as of
from helpers import assert_moves, assert_same_trajectory, make_model, trajectory, two_groups


class RefADOPT(torch.optim.Optimizer):
    """ADOPT one tensor at a time; ``clip=False``: no clipping. ``decouple``: decoupled
    weight decay p *= 1 - lr wd (from step 2 on), else coupled L2 (g += wd p, every step)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.9999), eps=1e-6, clip=True, clip_exponent=0.25,
                 weight_decay=0.0, decouple=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, clip=clip, clip_exponent=clip_exponent,
                                      weight_decay=weight_decay, decouple=decouple))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.clone()
                if not group["decouple"]:
                    g = g + wd * p
                st = self.state[p]
                if not st:
                    st.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                st["t"] += 1
                t = st["t"]
                if t == 1:                                   # initialize v only
                    st["v"] = g * g
                    continue
                if group["decouple"]:
                    p.mul_(1 - lr * wd)
                u = g / torch.clamp(st["v"].sqrt(), min=eps)
                if group["clip"]:
                    c = (t - 1) ** group["clip_exponent"]
                    u = u.clamp(-c, c)
                st["m"] = b1 * st["m"] + (1 - b1) * u
                p.sub_(lr * st["m"])
                st["v"] = b2 * st["v"] + (1 - b2) * g * g


CASES = [
    dict(lr=1e-3, betas=(0.9, 0.9999), weight_decay=0.0),              # the reference's defaults
    dict(lr=1e-2, betas=(0.8, 0.9), weight_decay=0.1),                 # coupled L2
    dict(lr=1e-2, betas=(0.8, 0.9), weight_decay=0.1, decouple=True),  # decoupled
    dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0, clip=False),
    dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0, clip_exponent=0.1),
]


def ours(case, fused):
    case = dict(case)
    lr, wd = case.pop("lr"), case.pop("weight_decay")
    mode = "decoupled" if case.pop("decouple", False) else "coupled"
    model = make_model()
    return trajectory(model, of.ADOPT(two_groups(model, lr, wd), lr=lr, weight_decay_mode=mode,
                                      fused=fused, **case))


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_adopt_matches_reference(case, fused):
    case_ = dict(case)
    lr, wd = case_.pop("lr"), case_.pop("weight_decay")
    model = make_model()
    ref = trajectory(model, RefADOPT(two_groups(model, lr, wd), lr=lr, **case_))
    traj = ours(case, fused)
    assert_moves(traj)
    assert_same_trajectory(traj, ref)
    torch.testing.assert_close(traj[0], make_model_params(), rtol=0, atol=0)  # step 1: no update


def make_model_params():
    return torch.cat([p.detach().flatten() for p in make_model().parameters()])


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("case", [c for c in CASES if "clip" not in c and "clip_exponent" not in c],
                         ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_adopt_matches_torch_adopt(case, fused):
    adopt = pytest.importorskip("adopt")
    case_ = dict(case)
    lr, wd = case_.pop("lr"), case_.pop("weight_decay")
    model = make_model()
    ref = trajectory(model, adopt.ADOPT(two_groups(model, lr, wd), lr=lr, foreach=False, **case_))
    assert_same_trajectory(ours(case, fused), ref)


def test_adopt_defaults_match_reference():
    import inspect

    adopt = pytest.importorskip("adopt")
    ref = inspect.signature(adopt.ADOPT).parameters
    params = inspect.signature(of.ADOPT).parameters
    for name in ("lr", "betas", "eps", "weight_decay"):
        assert params[name].default == ref[name].default
    assert params["clip"].default is True and params["clip_exponent"].default == 0.25
    assert params["weight_decay_mode"].default == "coupled"   # the reference's decouple=False
