"""NorMuon: full 50-step float64 trajectories, rtol 1e-10, against a per-tensor reference written
here from what the authors' code (zichongli5/NorMuon, ``normuon.py``, ``SingleDeviceNorMuon`` and
``SingleDeviceNorMuonWithAuxAdam``, before its bf16-only change) does, with its Newton-Schulz run in
float64: wide, tall and one-row matrices by NorMuon, biases by the AdamW fallback, each group with
its own lr and decay; conv kernels as their (out, -1) matrix; and the split ``create_optimizer``
makes."""

import pytest
import torch
from torch import nn

import optforge as of
from helpers import assert_moves, assert_same_trajectory, make_model, trajectory

NS = (3.4445, -4.7750, 2.0315)


def mlp(seed=0):
    """2-D weights wide (12x72), tall (20x12) and a row (1x20), plus biases."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(72, 12), nn.Tanh(), nn.Linear(12, 20), nn.Tanh(),
                         nn.Linear(20, 1)).double()


def groups(model, lr, weight_decay):
    """Two NorMuon groups (matrices) and one AdamW group (biases), each with its own lr and decay."""
    w = [m.weight for m in model if isinstance(m, nn.Linear)]
    b = [m.bias for m in model if isinstance(m, nn.Linear)]
    return [{"params": w[:2], "lr": lr, "weight_decay": weight_decay, "use_muon": True},
            {"params": w[2:], "lr": lr * 0.5, "weight_decay": weight_decay * 0.3, "use_muon": True},
            {"params": b, "lr": lr * 0.1, "weight_decay": weight_decay * 0.5, "use_muon": False}]


# ---- a reference from the authors' code's behaviour -----------------------------------------------
def newton_schulz(g, steps=5, eps=1e-7):
    """Jordan's original quintic iteration, on the wide orientation, in g's dtype."""
    a, b, c = NS
    tall = g.size(0) > g.size(1)
    x = g.T if tall else g
    x = x / (x.norm() + eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class AuthorsNorMuon(torch.optim.Optimizer):
    """NorMuon on the ``use_muon=True`` groups, Adam with decoupled decay on the others, one
    tensor at a time (2-D params only on the NorMuon side)."""

    def __init__(self, params, momentum, beta2, nesterov, betas, eps):
        super().__init__(params, dict(momentum=momentum, beta2=beta2, nesterov=nesterov, betas=betas,
                                      eps=eps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                update = (self.normuon(p, group) if group["use_muon"] else self.adam(p, group))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"])

    def normuon(self, p, group):
        st, g, mu = self.state[p], p.grad, group["momentum"]
        if not st:
            st.update(m=torch.zeros_like(p), v=torch.zeros_like(p[:, :1]))
        st["m"].lerp_(g, 1 - mu)
        u = g.lerp(st["m"], mu) if group["nesterov"] else st["m"]
        o = newton_schulz(u)
        before = o.norm()
        st["v"].lerp_((o * o).mean(dim=-1, keepdim=True), 1 - group["beta2"])
        o = o * (1 / (st["v"].sqrt() + 1e-10))
        o = o * (before / (o.norm() + 1e-10))
        return o * max(1, p.size(0) / p.size(1)) ** 0.5

    def adam(self, p, group):
        st, g, (b1, b2) = self.state[p], p.grad, group["betas"]
        if not st:
            st.update(m=torch.zeros_like(p), v=torch.zeros_like(p), t=0)
        st["t"] += 1
        st["m"].lerp_(g, 1 - b1)
        st["v"].lerp_(g * g, 1 - b2)
        m_hat, v_hat = st["m"] / (1 - b1 ** st["t"]), st["v"] / (1 - b2 ** st["t"])
        return m_hat / (v_hat.sqrt() + group["eps"])


CASES = [  # lr, weight_decay, momentum, beta2, nesterov, adamw betas, adamw eps
    (0.02, 0.0, 0.95, 0.95, True, (0.9, 0.95), 1e-10),
    (0.02, 0.1, 0.95, 0.99, False, (0.9, 0.999), 1e-8),
    (5e-3, 0.05, 0.9, 0.9, True, (0.8, 0.95), 1e-8),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"nesterov{c[4]}-beta2_{c[3]}-wd{c[1]}")
def test_normuon_matches_authors_reference(case):
    lr, wd, momentum, beta2, nesterov, betas, eps = case
    model = mlp()
    ref = trajectory(model, AuthorsNorMuon(groups(model, lr, wd), momentum, beta2, nesterov, betas, eps))
    model = mlp()
    opt = of.NorMuon(groups(model, lr, wd), momentum=momentum, beta2=beta2, nesterov=nesterov,
                     ns_dtype="param", adamw_betas=betas, adamw_eps=eps)
    mine = trajectory(model, opt)
    assert_moves(mine)
    assert_same_trajectory(mine, ref)


def test_normalization_changes_the_step():
    """Against plain Muon with the same settings: the per-row normalization does something."""
    def run(cls, **kw):
        model = mlp()
        return trajectory(model, cls(groups(model, 0.02, 0.0), ns_dtype="param", weight_decay=0.0, **kw), 5)
    assert (run(of.NorMuon)[-1] - run(of.Muon, adjust_lr_fn="original")[-1]).abs().max() > 1e-4


def test_conv_kernel_is_normalized_as_its_matrix():
    """A (3, 2, 3, 3) kernel steps exactly as the same values held as a (3, 18) matrix."""
    torch.manual_seed(0)
    kernel = nn.Parameter(torch.randn(3, 2, 3, 3, dtype=torch.float64))
    matrix = nn.Parameter(kernel.detach().reshape(3, 18).clone())
    opt = of.NorMuon([kernel, matrix], ns_dtype="param", weight_decay=0.1)
    for step in range(10):
        g = torch.randn(3, 18, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        kernel.grad, matrix.grad = g.reshape(3, 2, 3, 3).clone(), g.clone()
        opt.step()
    assert torch.equal(kernel.detach().reshape(3, 18), matrix.detach())
    assert opt.state[kernel]["second_momentum_buffer"].shape == (3, 1)


def test_create_optimizer_splits_as_muon_does():
    """Matrices of hidden layers by NorMuon; biases and the output head by AdamW."""
    model = make_model()
    opt = of.create_optimizer(model, "normuon")
    routed = {id(p): g["use_muon"] for g in opt.param_groups for p in g["params"]}
    conv, _, hidden, _, head = model
    assert routed[id(conv.weight)] and routed[id(hidden.weight)]
    assert not routed[id(head.weight)] and not routed[id(conv.bias)]
    trajectory(model, opt, 3)
    assert opt.state[hidden.weight]["second_momentum_buffer"].shape == (5, 1)
