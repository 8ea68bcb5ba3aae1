"""SparseAdam and LBFGS against torch.optim's: float64 trajectories, state, state dicts both ways
and the errors torch raises."""

import re

import pytest
import torch
from torch import nn

import optforge as of
from helpers import assert_moves, assert_same_trajectory

# ---- SparseAdam --------------------------------------------------------------------------------


def embedding_run(cls, kwargs, steps=50, opt_state=None, start=None):
    """An nn.Embedding(sparse=True) trained on batches that repeat indices and leave rows out;
    returns the weight after each step, the optimizer and the rows each step touched."""
    torch.manual_seed(0)
    emb = nn.Embedding(25, 4, sparse=True, dtype=torch.float64)
    if start is not None:
        emb.weight.data.copy_(start)
    opt = cls(emb.parameters(), **kwargs)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(25, 4, dtype=torch.float64, generator=gen)
    weights, touched = [], []
    for _ in range(steps):
        idx = torch.randint(0, 15, (8,), generator=gen)        # rows 15.. never get a gradient
        opt.zero_grad()
        ((emb(idx) - target[idx]) ** 2).sum().backward()
        opt.step()
        weights.append(emb.weight.detach().clone())
        touched.append(idx.unique())
    return weights, opt, touched


SPARSE_ADAM_KWARGS = [
    pytest.param({}, id="default"),
    pytest.param(dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6), id="betas-eps"),
    pytest.param(dict(lr=0.05, maximize=True), id="maximize"),
    pytest.param(dict(lr=torch.tensor(0.03, dtype=torch.float64)), id="tensor-lr"),
]


@pytest.mark.parametrize("kwargs", SPARSE_ADAM_KWARGS)
def test_sparse_adam_matches_torch(kwargs):
    ours, opt, touched = embedding_run(of.SparseAdam, kwargs)
    theirs, ref, _ = embedding_run(torch.optim.SparseAdam, kwargs)
    assert_moves(ours)
    assert_same_trajectory(ours, theirs)
    for p, q in zip(opt.param_groups[0]["params"], ref.param_groups[0]["params"]):
        st, rt = opt.state[p], ref.state[q]
        assert float(st["step"]) == rt["step"] == 50
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(st[name], rt[name], rtol=1e-10, atol=1e-14)


def test_sparse_adam_rows_without_gradient_stay():
    weights, opt, touched = embedding_run(of.SparseAdam, dict(lr=0.05), steps=10)
    for before, after, rows in zip(weights, weights[1:], touched[1:]):
        still = torch.ones(25, dtype=torch.bool)
        still[rows] = False
        assert torch.equal(before[still], after[still])
        assert (before[rows] != after[rows]).any(dim=1).all()
    m = opt.state[opt.param_groups[0]["params"][0]]["exp_avg"]
    assert not m[15:].any()


@pytest.mark.parametrize("first,second", [(torch.optim.SparseAdam, of.SparseAdam),
                                          (of.SparseAdam, torch.optim.SparseAdam)],
                         ids=["torch-to-optforge", "optforge-to-torch"])
def test_sparse_adam_state_dict_both_ways(first, second):
    kwargs = dict(lr=0.05, betas=(0.8, 0.95))
    head, opt, _ = embedding_run(first, kwargs, steps=20)
    tail, _, _ = embedding_run(second, kwargs, steps=30, opt_state=opt.state_dict(), start=head[-1])
    # the reference: torch's optimizer throughout, resumed from its own state the same way
    ref_head, ref, _ = embedding_run(torch.optim.SparseAdam, kwargs, steps=20)
    ref_tail, _, _ = embedding_run(torch.optim.SparseAdam, kwargs, steps=30, opt_state=ref.state_dict(),
                                   start=ref_head[-1])
    assert_moves(tail)
    assert_same_trajectory(tail, ref_tail)


def test_sparse_adam_errors():
    p = nn.Parameter(torch.randn(3, 2, dtype=torch.float64))
    opt = of.SparseAdam([p])
    p.grad = torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="does not support dense gradients"):
        opt.step()
    assert not opt.state[p]                       # refused before anything was created
    with pytest.raises(ValueError, match="requires dense parameter tensors"):
        of.SparseAdam([torch.zeros(3, layout=torch.sparse_coo)])
    with pytest.raises(ValueError, match="does not support complex parameters"):
        of.SparseAdam([{"params": [torch.zeros(2, dtype=torch.complex64)]}])
    for bad, shown in ((dict(lr=0.0), "lr=0.0"), (dict(eps=0.0), "eps=0.0"),
                       (dict(betas=(1.0, 0.9)), "betas[0]=1.0")):
        with pytest.raises(ValueError, match=re.escape(f"invalid {shown}")):
            of.SparseAdam([p], **bad)
    with pytest.raises(TypeError, match="fused"):
        of.SparseAdam([p], fused=True)            # no fused path: the update indexes rows


# ---- LBFGS -------------------------------------------------------------------------------------


def rosenbrock(model):
    x = model.x
    return ((1 - x[::2]) ** 2 + 100 * (x[1::2] - x[::2] ** 2) ** 2).sum()


class Rosen(nn.Module):
    def __init__(self):
        super().__init__()
        self.x = nn.Parameter(torch.tensor([-1.5, 2.0, 0.3, -0.7], dtype=torch.float64))


def least_squares_problem():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(40, 6, dtype=torch.float64, generator=gen)
    noise = 0.1 * torch.randn(40, 2, dtype=torch.float64, generator=gen)
    b = a @ torch.randn(6, 2, dtype=torch.float64, generator=gen) + noise
    model = nn.Linear(6, 2, dtype=torch.float64)
    return model, lambda m: ((m(a) - b) ** 2).mean()


def logistic_problem():
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(60, 5, dtype=torch.float64, generator=gen)
    labels = (a @ torch.randn(5, 1, dtype=torch.float64, generator=gen) > 0).to(torch.float64)
    model = nn.Linear(5, 1, dtype=torch.float64)
    bce = nn.functional.binary_cross_entropy_with_logits
    return model, lambda m: bce(m(a), labels) + 1e-3 * m.weight.square().sum()


PROBLEMS = {"rosenbrock": lambda: (Rosen(), rosenbrock), "least_squares": least_squares_problem,
            "logistic": logistic_problem}


def lbfgs_run(cls, problem, kwargs, steps=25, opt_state=None, params=None):
    torch.manual_seed(0)
    model, loss_fn = PROBLEMS[problem]()
    if params is not None:
        torch.nn.utils.vector_to_parameters(params, model.parameters())
    opt = cls(model.parameters(), **kwargs)
    if opt_state is not None:
        opt.load_state_dict(opt_state)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model)
        loss.backward()
        return loss

    out, losses = [], []
    for _ in range(steps):
        losses.append(opt.step(closure).item())
        out.append(torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone())
    return out, opt, losses


LBFGS_SETTINGS = [
    pytest.param(dict(lr=0.5, max_iter=4, history_size=3), id="plain-history3"),
    pytest.param(dict(lr=0.5, max_iter=4), id="plain-history100"),
    pytest.param(dict(line_search_fn="strong_wolfe", max_iter=4, history_size=2), id="wolfe-history2"),
    pytest.param(dict(line_search_fn="strong_wolfe", max_iter=6, max_eval=9), id="wolfe-max_eval"),
    # a first trial step far too long: the zoom's safeguards (off the interval's ends) run
    pytest.param(dict(line_search_fn="strong_wolfe", lr=30.0, max_iter=4, history_size=2), id="wolfe-lr30"),
    pytest.param(dict(lr=torch.tensor(0.3, dtype=torch.float64), max_iter=3, history_size=5,
                      tolerance_change=1e-12), id="tensor-lr"),
]


def assert_same_lbfgs_state(st, rt):
    assert sorted(st) == sorted(rt)
    for name in st:
        a, b = st[name], rt[name]
        if isinstance(a, list):
            assert len(a) == len(b)
            for x, y in zip(a, b):
                if x is None or y is None:
                    assert x is y is None
                else:
                    torch.testing.assert_close(torch.as_tensor(x), torch.as_tensor(y), rtol=1e-9, atol=1e-12)
        else:
            torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64),
                                       torch.as_tensor(b, dtype=torch.float64), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("kwargs", LBFGS_SETTINGS)
def test_lbfgs_matches_torch(problem, kwargs):
    ours, opt, our_losses = lbfgs_run(of.LBFGS, problem, kwargs)
    theirs, ref, their_losses = lbfgs_run(torch.optim.LBFGS, problem, kwargs)
    assert_moves(ours)
    assert_same_trajectory(ours, theirs)
    torch.testing.assert_close(our_losses, their_losses, rtol=1e-10, atol=1e-14)
    p, q = opt.param_groups[0]["params"][0], ref.param_groups[0]["params"][0]
    assert_same_lbfgs_state(opt.state[p], ref.state[q])


@pytest.mark.parametrize("first,second", [(torch.optim.LBFGS, of.LBFGS), (of.LBFGS, torch.optim.LBFGS)],
                         ids=["torch-to-optforge", "optforge-to-torch"])
@pytest.mark.parametrize("kwargs", [dict(lr=0.5, max_iter=3, history_size=4),
                                    dict(line_search_fn="strong_wolfe", max_iter=3, history_size=4)],
                         ids=["plain", "wolfe"])
def test_lbfgs_state_dict_both_ways(first, second, kwargs):
    head, opt, _ = lbfgs_run(first, "rosenbrock", kwargs, steps=8)
    tail, resumed, _ = lbfgs_run(second, "rosenbrock", kwargs, steps=12, opt_state=opt.state_dict(),
                                 params=head[-1])
    whole, ref, _ = lbfgs_run(torch.optim.LBFGS, "rosenbrock", kwargs, steps=20)
    assert_same_trajectory(tail, whole[8:])
    p, q = resumed.param_groups[0]["params"][0], ref.param_groups[0]["params"][0]
    assert_same_lbfgs_state(resumed.state[p], ref.state[q])


def test_lbfgs_errors():
    p = nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = of.LBFGS([p])
    with pytest.raises(TypeError, match="needs a closure"):
        opt.step()
    opt.param_groups[0]["lr"] = 0.0      # the state-creating step of DCP's get_state_dict: DTensors only
    with pytest.raises(TypeError, match="supported with DTensor parameters only"):
        opt.step()
    opt.param_groups[0]["lr"] = 1
    with pytest.raises(ValueError, match="parameter groups"):
        of.LBFGS([{"params": [p]}, {"params": [nn.Parameter(torch.zeros(2))]}])
    for bad, shown in ((dict(lr=-1.0), "lr=-1.0"), (dict(max_iter=0), "max_iter=0"),
                       (dict(history_size=0), "history_size=0"),
                       (dict(tolerance_grad=-1.0), "tolerance_grad=-1.0"),
                       (dict(line_search_fn="armijo"), "line_search_fn='armijo'")):
        with pytest.raises(ValueError, match=re.escape(f"invalid {shown}")):
            of.LBFGS([p], **bad)
    with pytest.raises(TypeError, match="unexpected keyword argument 'histroy_size'"):
        of.LBFGS([p], histroy_size=3)
    opt.configure(skip_nonfinite=True)
    with pytest.raises(ValueError, match="skip_nonfinite"):
        opt.step(lambda: p.sum())
    assert not opt.state[p]
