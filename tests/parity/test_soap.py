"""SOAP: float64 parity over 50 steps with two param groups (the helpers' model: a conv kernel,
a (5, 48) weight whose 48 is above ``max_precond_dim``, a (1, 5) weight and biases), against
``pytorch_optimizer.SOAP`` (test-only dependency; a port of the authors' code) and against a
per-tensor reference written here from the paper's Algorithm 3 (for ``merge_dims`` and
``normalize_grads``, where pytorch_optimizer departs from the authors' code).

Conditioning: in directions where a Shampoo factor is still rank-deficient the rotated
gradient is rounding noise, which Adam divides by about eps; so the cases use eps=1e-6 and
refresh the eigenbases only once the factors they rotate have full rank (every 5 or 10 steps,
(48 x 48) not preconditioned), where two correct implementations agree to rounding."""

import inspect

import pytest
import torch

import optforge as of
from helpers import assert_moves, assert_same_trajectory, make_model, trajectory, two_groups
from optforge.optimizers.soap import merged_shape

pytorch_optimizer = pytest.importorskip("pytorch_optimizer")

# eigh and QR amplify rounding differences by 1 / (eigenvalue gap): two correct float64
# implementations drift apart by ~1e-12 over 50 steps (the parameters move by ~0.25)
RTOL, ATOL = 1e-8, 1e-10


@pytest.fixture
def reference_qr_in_float64(monkeypatch):
    """pytorch_optimizer runs its QR on ``.to(torch.float32)`` copies: make that float64 (its
    module's ``torch``, with float32 meaning float64; nothing else there names float32)."""
    import pytorch_optimizer.optimizer.soap as module

    class Float64Torch:
        float32 = torch.float64

        def __getattr__(self, name):
            return getattr(torch, name)

    monkeypatch.setattr(module, "torch", Float64Torch())


def run(cls, lr=3e-3, weight_decay=0.01, **kwargs):
    model = make_model()
    return trajectory(model, cls(two_groups(model, lr, weight_decay), lr=lr, **kwargs))


CASES = [
    dict(precondition_1d=False, correct_bias=True),
    dict(precondition_1d=True, correct_bias=True),
    dict(precondition_1d=True, correct_bias=False, betas=(0.95, 0.95), shampoo_beta=0.95),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"1d{c['precondition_1d']}-bias{c['correct_bias']}")
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_soap_matches_pytorch_optimizer(case, weight_decay, reference_qr_in_float64):
    kw = dict(dict(betas=(0.9, 0.95), shampoo_beta=0.9, eps=1e-6, precondition_frequency=5), **case)
    ref = run(pytorch_optimizer.SOAP, weight_decay=weight_decay, max_precondition_dim=20, **kw)
    mine = run(of.SOAP, weight_decay=weight_decay, max_precond_dim=20, **kw)
    assert_moves(mine)
    assert_same_trajectory(mine, ref, rtol=RTOL, atol=ATOL)


# ---- a per-tensor reference from the paper ------------------------------------------------------
def rotate(x, bases, back=False):
    """x multiplied along each dim i by Q_i^T (back: Q_i); None leaves a dim as it is."""
    for i, q in enumerate(bases):
        if q is not None:
            x = (x.movedim(i, -1) @ (q.T if back else q)).movedim(-1, i)
    return x


class PaperSOAP(torch.optim.Optimizer):
    """Algorithm 3 of Vyas et al. (2024), one tensor at a time, with the authors' merge_dims,
    normalize_grads, and decoupled decay after the step."""

    def __init__(self, params, lr, betas, shampoo_beta, eps, precondition_frequency, max_precond_dim,
                 merge_dims, precondition_1d, normalize_grads, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps,
                                      weight_decay=weight_decay, freq=precondition_frequency,
                                      top=max_precond_dim, merge=merge_dims, vec=precondition_1d,
                                      normalize=normalize_grads))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            (b1, b2), top = group["betas"], group["top"]
            for p in group["params"]:
                st = self.state[p]
                shape = merged_shape(list(p.shape), top) if group["merge"] and p.dim() > 1 else list(p.shape)
                g = p.grad.reshape(shape)
                if not st:
                    use = [d <= top and (p.dim() > 1 or group["vec"]) for d in shape]
                    st.update(t=0, m=torch.zeros_like(g), v=torch.zeros_like(g),
                              L=[torch.zeros(d, d, dtype=g.dtype) if u else None for d, u in zip(shape, use)])
                    self.accumulate(st, g, group["shampoo_beta"])
                    st["Q"] = [None if f is None else torch.linalg.eigh(f)[1].flip(1) for f in st["L"]]
                    continue
                st["t"] += 1
                t, q = st["t"], st["Q"]
                st["m"].mul_(b1).add_(g, alpha=1 - b1)
                st["v"].mul_(b2).add_(rotate(g, q) ** 2, alpha=1 - b2)
                n = rotate(rotate(st["m"], q) / (st["v"].sqrt() + group["eps"]), q, back=True)
                if group["normalize"]:
                    n = n / (1e-30 + n.pow(2).mean().sqrt())
                p.sub_(group["lr"] * (1 - b2**t) ** 0.5 / (1 - b1**t) * n.reshape(p.shape))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                self.accumulate(st, g, group["shampoo_beta"])
                if t % group["freq"] == 0:
                    self.power_iteration(st)

    @staticmethod
    def accumulate(st, g, beta):
        for i, f in enumerate(st["L"]):
            if f is not None:
                gi = g.movedim(i, 0).reshape(g.shape[i], -1)
                f.mul_(beta).add_(gi @ gi.T, alpha=1 - beta)

    @staticmethod
    def power_iteration(st):
        for i, (f, q) in enumerate(zip(st["L"], st["Q"])):
            if f is not None:
                order = torch.argsort(torch.diag(q.T @ f @ q), descending=True)
                st["v"] = st["v"].index_select(i, order)
                st["Q"][i] = torch.linalg.qr(f @ q[:, order])[0]


@pytest.mark.parametrize("merge_dims,normalize_grads,precondition_1d", [
    (False, False, True), (True, False, False), (True, True, True), (False, True, False)])
def test_soap_matches_paper_algorithm(merge_dims, normalize_grads, precondition_1d):
    """merge_dims with max_precond_dim=20: the (3, 2, 3, 3) kernel becomes (18, 3), the (5, 48)
    weight keeps its 48 unrotated, the (1, 5) weight becomes a vector of 5."""
    kw = dict(betas=(0.9, 0.95), shampoo_beta=0.9, eps=1e-6, precondition_frequency=10, max_precond_dim=20,
              merge_dims=merge_dims, precondition_1d=precondition_1d, normalize_grads=normalize_grads)
    ref = run(PaperSOAP, **kw)
    mine = run(of.SOAP, **kw)
    assert_moves(mine)
    assert_same_trajectory(mine, ref, rtol=RTOL, atol=ATOL)


def test_merged_shape_is_the_authors():
    assert merged_shape([3, 2, 3, 3], 20) == [18, 3]
    assert merged_shape([64, 32, 3, 3], 10000) == [6144, 3]
    assert merged_shape([64, 32, 3, 3], 4096) == [2048, 9]
    assert merged_shape([5, 48], 20) == [5, 48]
    assert merged_shape([30000, 3], 10000) == [30000, 3]


def test_state_and_first_step():
    """The first step only builds the preconditioner (the parameter does not move); the
    factors of the dims above max_precond_dim are absent; 1-D params are Adam's."""
    model = make_model()
    opt = of.SOAP(model.parameters(), max_precond_dim=20)
    before = [p.detach().clone() for p in model.parameters()]
    trajectory(model, opt, steps=1)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    conv, bias, linear = list(model.parameters())[:3]
    assert opt.state[conv]["GG"].shape == (9 + 4 + 9 + 9,)
    assert opt.state[linear]["Q"].shape == (25,)                         # the 48 x 48 factor absent
    assert opt.state[bias]["GG"].numel() == 0
    q = opt.state[linear]["Q"].view(5, 5)
    torch.testing.assert_close(q.T @ q, torch.eye(5, dtype=q.dtype))
    with pytest.raises(ValueError, match=r"max_precond_dim"):
        opt.param_groups[0]["max_precond_dim"] = 100
        trajectory(model, opt, steps=1)


def test_defaults_match_the_authors_code():
    ours = inspect.signature(of.SOAP).parameters
    authors = dict(lr=3e-3, betas=(0.95, 0.95), eps=1e-8, weight_decay=0.01, precondition_frequency=10,
                   max_precond_dim=10000, merge_dims=False, precondition_1d=False, normalize_grads=False,
                   correct_bias=True)
    for name, value in authors.items():
        assert ours[name].default == value, name
    assert ours["shampoo_beta"].default == ours["betas"].default[1]   # the authors' -1: "use beta2"
