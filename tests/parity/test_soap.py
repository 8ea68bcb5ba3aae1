"""SOAP: full 30-step float64 trajectories, rtol 1e-10, against a per-tensor reference written here
from what the authors' code (nikhilvyas/SOAP, ``soap.py``) does, for the default configuration and
each of its options, on a model with a 4-D kernel, two matrices and three biases in two param
groups, with a new batch every step and the eigenbases refreshed every 3 steps.

Conditioning: where a Shampoo factor is rank-deficient by two or more, the eigenbasis of its null
space is rounding noise and Adam's elementwise division is not invariant to it, so two correct
implementations part. The model keeps every factor of full rank, or deficient by one (a direction
fixed up to sign), whenever a basis is computed from rounded values (after the first step)."""

import inspect

import pytest
import torch
from torch import nn

import optforge as of
from helpers import assert_moves, assert_same_trajectory
from optforge.optimizers.soap import merged_shape

STEPS = 30


# ---- a reference from the authors' code's behaviour -----------------------------------------------
def merge_small_dims(shape, top):
    """The authors' merge_dims: size-1 dims dropped, then neighbours multiplied while <= top."""
    groups = []
    for d in [d for d in shape if d != 1] or [1]:
        if groups and groups[-1] * d <= top:
            groups[-1] *= d
        else:
            groups.append(d)
    return groups


def rotate(x, bases, back=False):
    """x multiplied along each dim i by Q_i^T (back: by Q_i); None leaves a dim as it is."""
    for i, q in enumerate(bases):
        if q is not None:
            x = (x.movedim(i, -1) @ (q.T if back else q)).movedim(-1, i)
    return x


class AuthorsSOAP(torch.optim.Optimizer):
    """nikhilvyas/SOAP's algorithm, one tensor at a time, every decomposition in the parameter's
    dtype: the first step only builds the factors and eigenbases; the first moment lives in the
    eigenbasis and is rotated back to the parameter's basis and forth again after every step."""

    def __init__(self, params, lr=3e-3, betas=(0.95, 0.95), shampoo_beta=-1, eps=1e-8, weight_decay=0.01,
                 precondition_frequency=10, max_precond_dim=10000, merge_dims=False, precondition_1d=False,
                 normalize_grads=False, data_format="channels_first", correct_bias=True):
        super().__init__(params, dict(lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps,
                                      weight_decay=weight_decay, every=precondition_frequency,
                                      top=max_precond_dim, merge=merge_dims, vec=precondition_1d,
                                      normalize=normalize_grads, debias=correct_bias))
        self.channels_last = data_format == "channels_last"

    # the tensor as it is preconditioned: 4-D channels-last permuted to channels-first, dims merged
    def fold(self, x, group):
        if not group["merge"] or x.dim() < 2:
            return x
        if self.channels_last and x.dim() == 4:
            x = x.permute(0, 3, 1, 2)
        return x.reshape(merge_small_dims(x.shape, group["top"]))

    def unfold(self, y, like, group):
        if not group["merge"] or like.dim() < 2:
            return y
        if self.channels_last and like.dim() == 4:
            n, h, w, c = like.shape
            return y.reshape(n, c, h, w).permute(0, 2, 3, 1)
        return y.reshape(like.shape)

    def to_eigenbasis(self, x, st, group, back=False):
        return self.unfold(rotate(self.fold(x, group), st["Q"], back), x, group)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            beta_s = group["shampoo_beta"] if group["shampoo_beta"] >= 0 else b2
            for p in group["params"]:
                st, g = self.state[p], p.grad
                if not st:
                    self.first_step(st, p, group, beta_s)
                    continue
                st["t"] += 1
                t = st["t"]
                g_rot = self.to_eigenbasis(g, st, group)
                st["m"] = b1 * st["m"] + (1 - b1) * g_rot
                st["v"] = b2 * st["v"] + (1 - b2) * g_rot**2
                n = self.to_eigenbasis(st["m"] / (st["v"].sqrt() + group["eps"]), st, group, back=True)
                if group["normalize"]:
                    n = n / (1e-30 + n.pow(2).mean().sqrt())
                scale = (1 - b2**t) ** 0.5 / (1 - b1**t) if group["debias"] else 1.0
                p.sub_(group["lr"] * scale * n)
                if group["weight_decay"] > 0:
                    p.sub_(group["lr"] * group["weight_decay"] * p)
                st["m"] = self.to_eigenbasis(st["m"], st, group, back=True)
                self.accumulate(st, self.fold(g, group), beta_s)
                if t % group["every"] == 0:
                    self.power_iteration(st, group, p)
                st["m"] = self.to_eigenbasis(st["m"], st, group)

    def first_step(self, st, p, group, beta_s):
        """The factors and their eigenbases (by decreasing eigenvalue); the parameter stays."""
        g = self.fold(p.grad, group)
        rotated = [d <= group["top"] and (p.dim() > 1 or group["vec"]) for d in g.shape]
        st.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p),
                  L=[torch.zeros(d, d, dtype=p.dtype) if r else None for d, r in zip(g.shape, rotated)])
        self.accumulate(st, g, beta_s)
        eye = lambda f: torch.eye(len(f), dtype=f.dtype)   # noqa: E731
        st["Q"] = [None if f is None else torch.linalg.eigh(f + 1e-30 * eye(f))[1].flip(1) for f in st["L"]]

    @staticmethod
    def accumulate(st, g, beta):
        for i, f in enumerate(st["L"]):
            if f is not None:
                gi = g.movedim(i, 0).reshape(g.shape[i], -1)
                f.mul_(beta).add_(gi @ gi.T, alpha=1 - beta)

    def power_iteration(self, st, group, p):
        v = self.fold(st["v"], group)
        for i, (f, q) in enumerate(zip(st["L"], st["Q"])):
            if f is not None:
                order = torch.argsort(torch.diag(q.T @ f @ q), descending=True)
                v = v.index_select(i, order)
                st["Q"][i] = torch.linalg.qr(f @ q[:, order])[0]
        st["v"] = self.unfold(v, p, group)


# ---- the model, the data, the trajectories --------------------------------------------------------
class Net(nn.Module):
    """A (4, 2, 3, 3) kernel, then per pixel a (4, 4) and a (3, 4) matrix; biases of 4, 4, 3."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.mix, self.out = nn.Conv2d(2, 4, 3), nn.Linear(4, 4), nn.Linear(4, 3)
        self.double()

    def forward(self, x):
        h = torch.tanh(self.conv(x)).permute(0, 2, 3, 1)          # (batch, 4, 4, 4 channels)
        return self.out(torch.tanh(self.mix(h)))


def run(cls, lr=3e-3, weight_decay=0.01, steps=STEPS, **kwargs):
    """Parameters after each step; two groups (the biases: half the lr, 0.3 of the decay)."""
    model = Net()
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() > 1], "lr": lr, "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() == 1], "lr": lr / 2,
               "weight_decay": weight_decay * 0.3}]
    opt = cls(groups, **kwargs)
    data = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        x = torch.randn(8, 2, 6, 6, generator=data, dtype=torch.float64)
        y = torch.randn(8, 4, 4, 3, generator=data, dtype=torch.float64)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        out.append(torch.cat([p.detach().flatten() for p in params]))
    return out


# With max_precond_dim=8 merge_dims views the kernel as (8, 3, 3), channels-last as (4, 6, 3); with
# 3, only the kernel's 2, 3, 3, the (3, 4) matrix's 3 and the 3-bias (precondition_1d) rotate.
CASES = {
    "default": dict(),
    "merge_dims": dict(merge_dims=True, max_precond_dim=8),
    "channels_last": dict(merge_dims=True, max_precond_dim=8, data_format="channels_last"),
    "precondition_1d": dict(precondition_1d=True),
    "max_precond_dim": dict(max_precond_dim=3, precondition_1d=True),
    "normalize_grads": dict(normalize_grads=True),
    "correct_bias_off": dict(correct_bias=False, betas=(0.9, 0.99)),      # shampoo_beta -1: 0.99
    "shampoo_beta": dict(shampoo_beta=0.8, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.0),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_soap_matches_the_authors_algorithm(case):
    kw = dict(precondition_frequency=3, **case)
    ref = run(AuthorsSOAP, **kw)
    mine = run(of.SOAP, **kw)
    assert_moves(mine)
    assert_same_trajectory(mine, ref, rtol=1e-10, atol=1e-12)


def test_merging_is_the_authors():
    assert merged_shape([4, 2, 3, 3], 8) == merge_small_dims([4, 2, 3, 3], 8) == [8, 3, 3]
    assert merged_shape([64, 32, 3, 3], 10000) == [6144, 3]
    assert merged_shape([64, 32, 3, 3], 4096) == [2048, 9]
    assert merged_shape([5, 48], 20) == [5, 48]
    for shape in ([1, 30], [5, 1], [1, 1], [3, 1, 7, 1, 2], [30000, 3], [2, 30, 1, 5]):
        assert merged_shape(shape, 20) == merge_small_dims(shape, 20), shape


def test_state_and_first_step():
    """The first step only builds the preconditioner (the parameters do not move); dims above
    max_precond_dim get no factor; 1-D params none unless precondition_1d."""
    model = Net()
    opt = of.SOAP(model.parameters(), max_precond_dim=3)
    before = [p.detach().clone() for p in model.parameters()]
    ((model(torch.randn(2, 2, 6, 6, dtype=torch.float64)) - 1) ** 2).mean().backward()
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert opt.state[model.conv.weight]["GG"].shape == (4 + 9 + 9,)   # the 4 is above max_precond_dim
    assert opt.state[model.mix.weight]["Q"].numel() == 0
    assert opt.state[model.out.bias]["GG"].numel() == 0
    q = opt.state[model.out.weight]["Q"].view(3, 3)
    torch.testing.assert_close(q.T @ q, torch.eye(3, dtype=q.dtype))
    opt.param_groups[0]["max_precond_dim"] = 100
    state = {k: v.clone() for k, v in opt.state[model.conv.weight].items()}
    with pytest.raises(ValueError, match=r"max_precond_dim"):
        opt.step()
    assert all(torch.equal(v, opt.state[model.conv.weight][k]) for k, v in state.items())   # nothing changed


def test_shampoo_beta_is_minus_one_or_a_beta():
    p = [torch.zeros(2, 2, requires_grad=True)]
    for good in (-1, -1.0, 0.0, 0.9):
        of.SOAP(p, shampoo_beta=good)
    for bad in (-0.5, -2, 1.0, float("nan")):
        with pytest.raises(ValueError, match=rf"shampoo_beta={bad!r}: expected -1 \(use betas\[1\]\)"):
            of.SOAP(p, shampoo_beta=bad)


def test_defaults_are_the_authors():
    ours = inspect.signature(of.SOAP).parameters
    authors = dict(lr=3e-3, betas=(0.95, 0.95), shampoo_beta=-1, eps=1e-8, weight_decay=0.01,
                   precondition_frequency=10, max_precond_dim=10000, merge_dims=False, precondition_1d=False,
                   normalize_grads=False, data_format="channels_first", correct_bias=True)
    assert list(ours)[1:len(authors) + 1] == list(authors)             # and in the authors' order
    for name, value in authors.items():
        assert ours[name].default == value, name
