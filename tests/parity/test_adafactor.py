"""Float64 parity of optforge's Adafactor (50 steps, two param groups, 4-D, 2-D and 1-D params):

- with ``torch.optim.Adafactor``, given the same arguments (its defaults are optforge's), both
  its for-loop and foreach paths, and state dicts moving both ways;
- with a per-tensor reference written here from the paper's algorithm boxes: Shazeer & Stern,
  2018, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", arXiv:1804.04235,
  Algorithm 4 (matrices) and Algorithm 5 (vectors), for the options torch lacks (absolute step,
  no parameter scaling, the first moment of the authors' tensor2tensor code)."""

import copy
import inspect
import math

import pytest
import torch

import optforge as of
from helpers import assert_moves, assert_same_trajectory, make_model, trajectory, two_groups

PAPER = dict(eps=(1e-30, 1e-3), eps_placement="add")      # the paper's settings, torch's otherwise


@pytest.mark.parametrize("foreach", [False, True], ids=["for-loop", "foreach"])
@pytest.mark.parametrize("lr,weight_decay,kwargs", [
    (1e-2, 0.0, dict()),                                            # torch's defaults
    (3e-2, 0.1, dict(d=1.5)),                                       # decoupled decay: p *= 1 - lr wd
    (0.5, 0.05, dict(beta2_decay=-0.5, eps=(1e-6, 1e-2))),          # rho_t = 1/sqrt(t) from step 5
], ids=["defaults", "decay-clip", "lr-cap-eps"])
def test_matches_torch_adafactor(lr, weight_decay, kwargs, foreach):
    model_a, model_b = make_model(), make_model()
    ref = trajectory(model_a, torch.optim.Adafactor(two_groups(model_a, lr, weight_decay), lr=lr,
                                                    foreach=foreach, **kwargs))
    ours = trajectory(model_b, of.Adafactor(two_groups(model_b, lr, weight_decay), lr=lr,
                                            foreach=foreach, **kwargs))
    assert_moves(ours)
    assert_same_trajectory(ours, ref)


def test_maximize_matches_torch():
    model_a, model_b = make_model(), make_model()
    ref = trajectory(model_a, torch.optim.Adafactor(two_groups(model_a, 1e-2, 0.1), maximize=True),
                     loss_fn=lambda m, x, y: -((m(x) - y) ** 2).mean())
    ours = trajectory(model_b, of.Adafactor(two_groups(model_b, 1e-2, 0.1), maximize=True),
                      loss_fn=lambda m, x, y: -((m(x) - y) ** 2).mean())
    assert_same_trajectory(ours, ref)


def test_torch_loads_our_state_and_continues_alike():
    """Our per-parameter state has torch's names and shapes (row_var (..., n, 1), col_var
    (..., 1, m), variance); torch ignores the empty entries a tensor does not use, and reads
    the param groups (torch's names)."""
    model = make_model()
    ours = of.Adafactor(two_groups(model, 1e-2, 0.1))
    trajectory(model, ours, steps=10)
    probe = make_model()
    own = torch.optim.Adafactor(probe.parameters())
    trajectory(probe, own, steps=1)
    for p, q in zip(model.parameters(), probe.parameters()):
        for name, x in own.state[q].items():
            assert ours.state[p][name].shape == x.shape, name
    model_t = copy.deepcopy(model)
    theirs = torch.optim.Adafactor(two_groups(model_t, 5e-2, 0.3))    # hyperparameters loaded too
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()))
    assert_same_trajectory(trajectory(model_t, theirs, steps=10), trajectory(model, ours, steps=10))


class RefAdafactor(torch.optim.Optimizer):
    """Algorithms 4 and 5, one tensor at a time, with sums as written (optforge uses means);
    a tensor with more than 2 dims is a stack of matrices over its last two dims. Options: the
    relative step rho_t = min(lr, 1/sqrt(t)) (the paper's lr = 1e-2) or rho_t = lr; parameter
    scaling alpha_t = max(eps2, RMS(X)) rho_t or alpha_t = rho_t; tensor2tensor's first moment
    m_t = beta1 m + (1 - beta1) alpha_t U^_t; torch's decoupled decay X *= 1 - lr wd (after alpha_t).
    Uses no optforge code."""

    def __init__(self, params, lr=1e-2, c=0.8, eps1=1e-30, eps2=1e-3, d=1.0, beta1=0.0,
                 relative_step=True, scale_parameter=True, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, c=c, eps1=eps1, eps2=eps2, d=d, beta1=beta1,
                                      relative_step=relative_step, scale_parameter=scale_parameter,
                                      weight_decay=weight_decay))

    @staticmethod
    def rms(x):
        return (x.square().sum() / x.numel()).sqrt().item()

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, eps1, d, beta1 = group["lr"], group["eps1"], group["d"], group["beta1"]
            for x in group["params"]:
                G = x.grad
                st = self.state[x]
                if not st:
                    st["t"] = 0
                    st["m"] = torch.zeros_like(x)
                    if x.dim() >= 2:
                        st["R"] = torch.zeros(*x.shape[:-1], 1, dtype=x.dtype)
                        st["C"] = torch.zeros(*x.shape[:-2], 1, x.shape[-1], dtype=x.dtype)
                    else:
                        st["V"] = torch.zeros_like(x)
                st["t"] += 1
                t = st["t"]
                beta2 = 1 - t ** -group["c"]                                   # beta2_t = 1 - t^-c
                rho = min(lr, 1 / math.sqrt(t)) if group["relative_step"] else lr
                alpha = max(group["eps2"], self.rms(x)) * rho if group["scale_parameter"] else rho
                x.mul_(1 - lr * group["weight_decay"])
                G2 = G * G + eps1
                if x.dim() >= 2:
                    st["R"] = beta2 * st["R"] + (1 - beta2) * G2.sum(-1, keepdim=True)   # (G^2 + eps1) 1_m
                    st["C"] = beta2 * st["C"] + (1 - beta2) * G2.sum(-2, keepdim=True)   # 1_n^T (G^2 + eps1)
                    V = st["R"] @ st["C"] / st["R"].sum(-2, keepdim=True)              # R C / 1_n^T R
                else:
                    st["V"] = beta2 * st["V"] + (1 - beta2) * G2
                    V = st["V"]
                U = G / V.sqrt()
                U_hat = U / max(1.0, self.rms(U) / d)
                if beta1 > 0:
                    st["m"] = beta1 * st["m"] + (1 - beta1) * alpha * U_hat
                    x.sub_(st["m"])
                else:
                    x.sub_(alpha * U_hat)


PAPER_CASES = [  # (lr, optforge kwargs, reference kwargs)
    (1e-2, PAPER, dict()),                                                         # the paper's defaults
    (0.15, PAPER, dict()),                                                         # 1/sqrt(t) binds from t=45
    (1e-3, dict(PAPER, relative_step=False), dict(relative_step=False)),           # absolute step
    (1e-3, dict(PAPER, relative_step=False, scale_parameter=False),
     dict(relative_step=False, scale_parameter=False)),
    (1e-2, dict(PAPER, momentum=0.9), dict(beta1=0.9)),                            # first moment (t2t)
    (3e-2, dict(d=0.3, beta2_decay=-0.5, eps=(1e-12, 1e-2), eps_placement="add"),  # clipping binds
     dict(d=0.3, c=0.5, eps1=1e-12, eps2=1e-2)),
]


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("lr,ours,ref", PAPER_CASES,
                         ids=["paper", "lr-cap", "absolute", "absolute-unscaled", "momentum", "clip-c-eps"])
def test_matches_paper_reference(lr, ours, ref, weight_decay):
    model_a, model_b = make_model(), make_model()
    a = trajectory(model_a, of.Adafactor(two_groups(model_a, lr, weight_decay), lr=lr, **ours))
    b = trajectory(model_b, RefAdafactor(two_groups(model_b, lr, weight_decay), lr=lr, **ref))
    assert_moves(a)
    assert_same_trajectory(a, b)


def test_defaults_are_torchs():
    ours = inspect.signature(of.Adafactor).parameters
    theirs = inspect.signature(torch.optim.Adafactor).parameters
    assert list(ours)[:len(theirs)] == list(theirs)
    assert all(ours[n].default == p.default for n, p in theirs.items())
    assert ours["eps_placement"].default == "clamp"     # torch's placement of eps1
    assert ours["momentum"].default == 0.0
    assert ours["relative_step"].default and ours["scale_parameter"].default
    assert ours["weight_decay_mode"].default == "decoupled"


def test_earlier_names_still_work():
    """beta2_exponent / a number eps with eps_scale / clip_threshold: optforge's earlier names."""
    p = torch.nn.Parameter(torch.randn(3, 2))
    old = of.Adafactor([p], beta2_exponent=0.5, eps=1e-12, eps_scale=1e-2, clip_threshold=0.3)
    new = of.Adafactor([p], beta2_decay=-0.5, eps=(1e-12, 1e-2), d=0.3)
    assert old.defaults == new.defaults
    assert of.Adafactor([p], eps=1e-30).defaults["eps"] == (1e-30, 1e-3)
    with pytest.raises(ValueError, match=r"clip_threshold=2\.0 with d=3\.0"):
        of.Adafactor([p], d=3.0, clip_threshold=2.0)
    with pytest.raises(ValueError, match=r"beta2_exponent=-0\.5"):
        of.Adafactor([p], beta2_exponent=-0.5)


def test_no_first_moment_state_by_default():
    p = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    opt = of.Adafactor([p])
    p.grad = torch.randn_like(p)
    opt.step()
    assert sorted(opt.state[p]) == ["col_var", "row_var", "step", "variance"]


def test_fused_and_complex_are_refused():
    with pytest.raises(ValueError, match="fused"):
        of.Adafactor(make_model().parameters(), fused=True)
    p = torch.nn.Parameter(torch.randn(3, 3, dtype=torch.complex128))
    opt = of.Adafactor([p])
    p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match="complex"):
        opt.step()
    assert not of.get_optimizer_info("adafactor").elementwise
