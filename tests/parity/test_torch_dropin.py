"""``torch.optim.X(...)`` -> ``optforge.X(...)`` is a one-word change, for every optforge class
with a torch twin: the same signature (order, names, defaults), torch's flags accepted and
kept in the param groups, and checkpoints moving both ways mid-run (float64 trajectories,
rtol 1e-10, against torch uninterrupted)."""

import copy
import inspect

import pytest
import torch
from torch import nn

import optforge as of
from helpers import assert_moves, assert_same_trajectory, make_model, trajectory, two_groups

TWINS = [  # (optforge class, torch class)
    (of.SGD, torch.optim.SGD),
    (of.Adam, torch.optim.Adam),
    (of.AdamW, torch.optim.AdamW),
    (of.AMSGrad, torch.optim.Adam),
    (of.RAdam, torch.optim.RAdam),
    (of.Adafactor, torch.optim.Adafactor),
    (of.Muon, torch.optim.Muon),
]
P = inspect.Parameter


@pytest.mark.parametrize("ours,theirs", TWINS, ids=lambda c: c.__module__.split(".")[0] + "." + c.__name__)
def test_signature_is_torchs(ours, theirs):
    """Every torch parameter: same kind, same position (positional ones), same default (AMSGrad
    differs only in amsgrad=True, its reason to exist)."""
    mine, ref = inspect.signature(ours).parameters, inspect.signature(theirs).parameters
    positional = [n for n, p in ref.items() if p.kind == P.POSITIONAL_OR_KEYWORD]
    assert [n for n, p in mine.items() if p.kind == P.POSITIONAL_OR_KEYWORD][:len(positional)] == positional
    for name, p in ref.items():
        assert name in mine, name
        assert mine[name].kind == p.kind, name
        if (ours, name) != (of.AMSGrad, "amsgrad"):
            assert mine[name].default == p.default, name
    assert ours is not of.AMSGrad or mine["amsgrad"].default is True


def torch_flags(cls):
    return [n for n in ("foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay")
            if n in inspect.signature(cls).parameters]


@pytest.mark.parametrize("ours,theirs", TWINS, ids=lambda c: c.__name__)
def test_param_groups_carry_torchs_keys(ours, theirs):
    """An optforge state dict has every key torch's param groups have (so torch reads it),
    with torch's values for the defaults."""
    p, q = nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(3, 2))
    mine, ref = ours([p]).param_groups[0], theirs([q]).param_groups[0]
    assert set(ref) <= set(mine)
    differs = {"amsgrad"} if ours is of.AMSGrad else set()
    assert {k: v for k, v in ref.items() if k not in differs | {"params"}} == \
        {k: mine[k] for k in ref if k not in differs | {"params"}}


@pytest.mark.parametrize("foreach", [None, True, False])
def test_foreach_any_value_same_trajectory(foreach):
    model_a, model_b = make_model(), make_model()
    a = trajectory(model_a, of.Adam(two_groups(model_a, 1e-2, 0.1)), steps=10)
    opt = of.Adam(two_groups(model_b, 1e-2, 0.1), foreach=foreach)
    assert opt.param_groups[0]["foreach"] is foreach
    for x, y in zip(a, trajectory(model_b, opt, steps=10)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("flag", ["capturable", "differentiable"])
def test_capturable_and_differentiable_true_are_refused(flag):
    p = nn.Parameter(torch.zeros(2))
    for cls in (of.Adam, of.AdamW, of.AMSGrad, of.RAdam):
        cls([p], **{flag: False})
        with pytest.raises(ValueError, match=rf"invalid {flag}=True: expected False \(optforge"):
            cls([p], **{flag: True})
        with pytest.raises(ValueError, match=rf"invalid {flag}=True"):
            cls([{"params": [p], flag: True}])


def test_fused_and_foreach_true_together_are_refused():
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"fused=True with foreach=True"):
        of.Adam([p], fused=True, foreach=True)
    of.Adam([p], fused=True, foreach=False)
    of.SGD([p], fused=None, foreach=True)


# ---- decoupled_weight_decay -------------------------------------------------------------------
@pytest.mark.parametrize("ours,theirs", [(of.Adam, torch.optim.Adam), (of.RAdam, torch.optim.RAdam)],
                         ids=["Adam", "RAdam"])
def test_decoupled_weight_decay_matches_torch(ours, theirs):
    model_a, model_b = make_model(), make_model()
    a = trajectory(model_a, ours(two_groups(model_a, 1e-2, 0.1), decoupled_weight_decay=True))
    b = trajectory(model_b, theirs(two_groups(model_b, 1e-2, 0.1), decoupled_weight_decay=True,
                                   foreach=False))
    assert_moves(a)
    assert_same_trajectory(a, b)


def test_decoupled_weight_decay_is_weight_decay_mode_decoupled():
    p = nn.Parameter(torch.zeros(2))
    for cls in (of.Adam, of.RAdam):
        group = cls([p], decoupled_weight_decay=True).param_groups[0]
        assert (group["weight_decay_mode"], group["decoupled_weight_decay"]) == ("decoupled", True)
        group = cls([p], weight_decay_mode="decoupled").param_groups[0]
        assert (group["weight_decay_mode"], group["decoupled_weight_decay"]) == ("decoupled", True)
        group = cls([p], weight_decay_mode="absolute").param_groups[0]
        assert (group["weight_decay_mode"], group["decoupled_weight_decay"]) == ("absolute", False)
        for mode in ("coupled", "absolute"):
            with pytest.raises(ValueError, match=rf"decoupled_weight_decay=True with .*mode='{mode}'"):
                cls([p], decoupled_weight_decay=True, weight_decay_mode=mode)
    assert of.AdamW([p]).param_groups[0]["decoupled_weight_decay"] is True
    assert of.AdamW([p], weight_decay_mode="coupled").param_groups[0]["decoupled_weight_decay"] is False


def test_a_group_sets_either_and_gets_both():
    p, q, r = (nn.Parameter(torch.zeros(2)) for _ in range(3))
    opt = of.Adam([{"params": [p], "decoupled_weight_decay": True}, {"params": [q]},
                   {"params": [r], "weight_decay_mode": "decoupled"}])
    assert [(g["weight_decay_mode"], g["decoupled_weight_decay"]) for g in opt.param_groups] == [
        ("decoupled", True), ("coupled", False), ("decoupled", True)]
    opt = of.AdamW([{"params": [p], "decoupled_weight_decay": False}])
    assert opt.param_groups[0]["weight_decay_mode"] == "coupled"
    with pytest.raises(ValueError, match="decoupled_weight_decay=True with weight_decay_mode='absolute'"):
        opt.add_param_group({"params": [q], "decoupled_weight_decay": True, "weight_decay_mode": "absolute"})
    assert len(opt.param_groups) == 1


# ---- checkpoints, both ways --------------------------------------------------------------------
def bias_free_mlp():
    """Matrices only: torch's Muon takes nothing else."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(72, 12, bias=False), nn.Tanh(),
                         nn.Linear(12, 20, bias=False), nn.Tanh(), nn.Linear(20, 1, bias=False)).double()


RESUME = [  # (id, optforge factory, torch factory, model)
    ("SGD-momentum-dampening", lambda ps: of.SGD(ps, lr=0.05, momentum=0.9, dampening=0.3),
     lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, dampening=0.3, foreach=False), make_model),
    ("SGD-nesterov", lambda ps: of.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
     lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, foreach=False),
     make_model),
    ("Adam", lambda ps: of.Adam(ps, lr=1e-2, weight_decay=0.1),
     lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1, foreach=False), make_model),
    ("Adam-decoupled", lambda ps: of.Adam(ps, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
     lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, foreach=False),
     make_model),
    ("AdamW-amsgrad", lambda ps: of.AdamW(ps, lr=1e-2, amsgrad=True),
     lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True, foreach=False), make_model),
    ("RAdam", lambda ps: of.RAdam(ps, lr=1e-2, betas=(0.9, 0.9), weight_decay=0.1),
     lambda ps: torch.optim.RAdam(ps, lr=1e-2, betas=(0.9, 0.9), weight_decay=0.1, foreach=False),
     make_model),
    ("Adafactor", lambda ps: of.Adafactor(ps, lr=3e-2, weight_decay=0.1),
     lambda ps: torch.optim.Adafactor(ps, lr=3e-2, weight_decay=0.1, foreach=False), make_model),
    ("Muon", lambda ps: of.Muon(ps, lr=2e-2, ns_dtype="param"),
     lambda ps: torch.optim.Muon(ps, lr=2e-2), bias_free_mlp),
]


@pytest.fixture
def float64_newton_schulz(monkeypatch):
    """torch's Muon casts to bf16 with ``Tensor.bfloat16``: a float64 copy instead, so that it
    compares with optforge's ns_dtype="param" in float64."""
    monkeypatch.setattr(torch.Tensor, "bfloat16", lambda self, *a, **k: self.clone())


@pytest.mark.parametrize("direction", ["torch-to-optforge", "optforge-to-torch"])
@pytest.mark.parametrize("name,ours,theirs,model_fn", RESUME, ids=[c[0] for c in RESUME])
def test_checkpoint_resumes_across_libraries(name, ours, theirs, model_fn, direction, float64_newton_schulz):
    """N steps in one library, state_dict, load_state_dict into the other, M more steps:
    torch's uninterrupted run. (torch's SGD and Muon keep no step count: a loaded momentum
    buffer is not a first step.)"""
    n, m = 12, 12
    ref_model = model_fn()
    expected = trajectory(ref_model, theirs(ref_model.parameters()), steps=n + m)
    first, second = (theirs, ours) if direction == "torch-to-optforge" else (ours, theirs)
    model = model_fn()
    opt = first(model.parameters())
    trajectory(model, opt, steps=n)
    saved = copy.deepcopy(opt.state_dict())                       # as torch.save/load would
    resumed_model = model_fn()
    resumed_model.load_state_dict(model.state_dict())
    resumed = second(resumed_model.parameters())
    resumed.load_state_dict(saved)
    got = trajectory(resumed_model, resumed, steps=m)
    assert_moves(expected[n:])
    assert_same_trajectory(got, expected[n:])


def test_torch_state_dict_keys_load_and_stay():
    """A torch Adam state dict (foreach, capturable, differentiable, fused,
    decoupled_weight_decay in its groups) loads; the flags are kept as torch wrote them."""
    p, q = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
    theirs = torch.optim.Adam([q], foreach=True, decoupled_weight_decay=True, weight_decay=0.1)
    q.grad = torch.ones(3)
    theirs.step()
    ours = of.Adam([p])
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    group = ours.param_groups[0]
    assert group["foreach"] is True and group["fused"] is None
    assert (group["weight_decay_mode"], group["decoupled_weight_decay"]) == ("decoupled", True)
    saved, written = ours.state_dict()["param_groups"][0], theirs.state_dict()["param_groups"][0]
    assert {k: saved[k] for k in written} == written


def test_a_torch_state_with_a_flag_optforge_lacks_is_refused_whole():
    p, q = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
    ours = of.Adam([p])
    state = torch.optim.Adam([q]).state_dict()
    state["param_groups"][0]["capturable"] = True
    before = copy.deepcopy(ours.state_dict())
    with pytest.raises(ValueError, match="capturable=True"):
        ours.load_state_dict(state)
    assert ours.state_dict() == before


# ---- sparse gradients (SGD) ---------------------------------------------------------------------
def embedding_run(opt_fn, steps=50, dense=False, sign=1.0):
    """An embedding of sparse rows: each step looks up random ids (repeats included); the
    loss times ``sign`` (-1 for maximize)."""
    torch.manual_seed(0)
    emb = nn.Embedding(20, 4, sparse=True).double()
    head = nn.Linear(4, 1).double()
    opt = opt_fn(list(emb.parameters()) + list(head.parameters()))
    gen = torch.Generator().manual_seed(3)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, 20, (6,), generator=gen)
        opt.zero_grad()
        (sign * ((head(emb(ids)) - 1.0) ** 2).mean()).backward()
        assert emb.weight.grad.is_sparse
        if dense:
            emb.weight.grad = emb.weight.grad.to_dense()
        opt.step()
        out.append(torch.cat([emb.weight.detach().flatten(), head.weight.detach().flatten()]).clone())
    return out


SPARSE_CASES = [dict(), dict(momentum=0.9), dict(momentum=0.9, dampening=0.3),
                dict(momentum=0.9, nesterov=True), dict(momentum=0.8, maximize=True)]


@pytest.mark.parametrize("kwargs", SPARSE_CASES,
                         ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "plain")
def test_sgd_sparse_gradients_match_torch(kwargs):
    sign = -1.0 if kwargs.get("maximize") else 1.0
    a = embedding_run(lambda ps: of.SGD(ps, lr=0.1, **kwargs), sign=sign)
    b = embedding_run(lambda ps: torch.optim.SGD(ps, lr=0.1, **kwargs), sign=sign)
    assert_moves(a)
    assert_same_trajectory(a, b)


@pytest.mark.parametrize("mode", ["coupled", "decoupled"])
def test_sgd_sparse_gradients_with_weight_decay_match_dense_ones(mode):
    """torch's SGD refuses weight decay with sparse gradients; here it is the same step as
    with the gradients made dense (coupled decay makes them dense)."""
    kwargs = dict(lr=0.1, momentum=0.9, weight_decay=0.05, weight_decay_mode=mode)
    a = embedding_run(lambda ps: of.SGD(ps, **kwargs))
    b = embedding_run(lambda ps: of.SGD(ps, **kwargs), dense=True)
    assert_moves(a)
    assert_same_trajectory(a, b)


def test_sgd_sparse_gradients_with_fused_run_eagerly():
    a = embedding_run(lambda ps: of.SGD(ps, lr=0.1, momentum=0.9), steps=10)
    b = embedding_run(lambda ps: of.SGD(ps, lr=0.1, momentum=0.9, fused=True), steps=10)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
