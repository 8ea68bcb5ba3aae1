"""Input validation, for every optforge optimizer: bad hyperparameters (at construction, in
param-group dicts and through add_param_group), bad param groups, unknown keywords, sparse
gradients and complex parameters."""

import copy
import math
import re

import pytest
import torch

import optforge as of
from helpers import NOT_GENERIC, assert_same_trajectory, optimizer_infos, optimizer_kwargs, optimizer_params
from optforge.registry import list_optimizers

INFOS = optimizer_infos()
NAN, INF = math.nan, math.inf


def test_every_exported_optimizer_is_registered():
    """So that the table-driven tests below cover every optimizer optforge exports."""
    exported = {getattr(of, n) for n in of.__all__}
    classes = {c for c in exported if isinstance(c, type) and issubclass(c, of.Optimizer)
               and c is not of.Optimizer}
    # SparseAdam and LBFGS leave the generic tables for a stated reason (helpers.NOT_GENERIC)
    generic_out = {info.cls for info in list_optimizers(with_info=True) if info.name in NOT_GENERIC}
    assert classes <= {i.cls for i in INFOS} | generic_out
    assert len(INFOS) >= 10


# ---- bad hyperparameter values -----------------------------------------------------------------
# (value, the part of it the message must show): the message must name the hyperparameter and
# repr() that part (for a tuple with one bad entry, the entry).
BAD_REAL = [(NAN, NAN), (INF, INF), (-INF, -INF), ("0.1", "0.1"), (True, True), (None, None),
            ([0.1], [0.1]), (1j, 1j)]
BAD_INT = [(NAN, NAN), (INF, INF), ("10", "10"), (True, True), (None, None), (-1, -1)]
BAD_BOOL = [("yes", "yes"), (1, 1), (0, 0), (None, None), (1.0, 1.0)]
BAD_STR = [("l2", "l2"), ("", ""), (None, None), ("Coupled", "Coupled"), (0, 0)]
BAD_BETAS = [((1.0, 0.999), 1.0), ((0.9, 1.0), 1.0), ((-0.1, 0.999), -0.1), ((NAN, 0.999), NAN),
             ((0.9, INF), INF), ((0.9, 1.5), 1.5), ((True, 0.999), True), (("0.9", 0.999), "0.9"),
             ((0.9,), (0.9,)), ((0.9, 0.99, 0.9), (0.9, 0.99, 0.9)), (0.9, 0.9), ("ab", "ab"),
             (None, None)]
# bad only for some hyperparameters: negative values and the like
EXTRA = {
    "lr": [(-1e-3, -1e-3)],
    "eps": [(-1e-8, -1e-8)],
    "weight_decay": [(-0.1, -0.1)],
    "momentum": [(-0.9, -0.9)],
    "dampening": [(-0.5, -0.5)],
    "amp_fac": [(-2.0, -2.0)],
    "warmup": [(2.5, 2.5), (-5, -5)],
    "d_model": [(0, 0), (-512, -512)],
    "capturable": [(True, True)],          # torch's flags optforge has not (optforge.torch_compat)
    "differentiable": [(True, True)],
    "d": [(0.0, 0.0), (-1.0, -1.0)],
    "beta2_decay": [(0.5, 0.5)],
}
EXTRA_FOR = {  # (optimizer name, hyperparameter): more bad values
    ("momentum_sgd", "momentum"): [(1.0, 1.0), (1.5, 1.5)],
    ("noam", "warmup"): [(0, 0)],
    ("prodigy", "beta3"): [(1.0, 1.0), (-0.1, -0.1), (NAN, NAN), ("0.9", "0.9"), ((0.9,), (0.9,))],
    ("prodigy", "d0"): [(0.0, 0.0)],
    ("prodigy", "d_coef"): [(0.0, 0.0)],
    ("prodigy", "growth_rate"): [(0.0, 0.0), (-1.0, -1.0)],
    ("muon", "ns_coefficients"): [((3.4, NAN, 2.0), NAN), ((3.4, -4.7, INF), INF)],
    ("mars", "gamma"): [(-0.1, -0.1)],
    ("mars", "lr_1d"): [(-1e-3, -1e-3)],
    ("mars", "weight_decay_1d"): [(-0.1, -0.1)],
    ("muon", "adjust_lr_fn"): [("l2", "l2"), ("", ""), (0, 0)],
    ("normuon", "ns_coefficients"): [((3.4, NAN, 2.0), NAN), ((3.4, -4.7, INF), INF)],
    ("normuon", "adjust_lr_fn"): [("l2", "l2"), ("", ""), (0, 0)],
    ("galore_adamw", "rank"): [(0, 0), (2.0, 2.0)],
    ("galore_adamw", "update_proj_gap"): [(0, 0)],
    ("galore_adamw", "scale"): [(-0.25, -0.25)],
    ("psgd_kron", "lr_preconditioner"): [(-0.1, -0.1)],
    ("psgd_kron", "momentum"): [(1.0, 1.0)],
    ("psgd_kron", "preconditioner_max_size"): [(-1.0, -1.0)],
    ("psgd_kron", "preconditioner_max_skew"): [(-1.0, -1.0)],
    ("psgd_kron", "preconditioner_init_scale"): [(0.0, 0.0), (-1.0, -1.0), (INF, INF), (NAN, NAN),
                                                  ("1", "1")],
    ("psgd_kron", "preconditioner_update_probability"): [(1.5, 1.5), (-0.1, -0.1)],
}
# hyperparameters whose bad values are not the generic ones for their default's type
BAD_FOR = {
    ("adafactor", "eps"): [((-1e-30, 1e-3), -1e-30), ((None, -1.0), -1.0), ((None, NAN), NAN),
                           ((INF, 1e-3), INF), ((1e-30,), (1e-30,)), (("ab", 1e-3), "ab"),
                           ((None, None), None), ((1e-30, 1e-3, 1.0), (1e-30, 1e-3, 1.0))],
    ("rprop", "etas"): [((1.0, 1.2), 1.0), ((0.5, 1.0), 1.0), ((0.0, 1.2), 0.0), ((-0.5, 1.2), -0.5),
                        ((NAN, 1.2), NAN), ((0.5, INF), INF), ((0.5,), (0.5,)), ("ab", "ab"), (None, None)],
    ("rprop", "step_sizes"): [((NAN, 50.0), NAN), ((1e-6, INF), INF), ((1e-6,), (1e-6,)), ("ab", "ab"),
                              (None, None)],
}
# Shampoo: betas[1] = 1 is a sum of the factors (valid), and start_preconditioning_step = -1
# means "at precondition_frequency"
BAD_FOR["shampoo", "betas"] = [(v, shown) for v, shown in BAD_BETAS if v != (0.9, 1.0)]
BAD_FOR["shampoo", "start_preconditioning_step"] = [(v, shown) for v, shown in BAD_INT if v != -1] + [(0, 0)]
# optional flags (None: torch's "not chosen"), and Adam's / RAdam's mode (None: as
# decoupled_weight_decay says): their bad values are the generic ones of their kind
OPTIONAL_KIND = {"foreach": False, "fused": False, "weight_decay_mode": "coupled"}
# values bad_values() would offer that a hyperparameter accepts (an unlimited growth rate)
VALID_FOR = {
    ("prodigy", "growth_rate"): [INF],
    ("adamw", "weight_decay_mode"): [None],     # as decoupled_weight_decay says: decoupled
    ("galore_adamw", "rank"): [None],           # a group without projection
    ("psgd_kron", "preconditioner_max_size"): [INF],    # no dim is too large for a dense factor
    ("psgd_kron", "preconditioner_max_skew"): [INF],
}
VALID = {"fused": [None]}       # torch's default fused=None: every optimizer accepts it


def bad_values(opt_name, name, default):
    if (opt_name, name) in BAD_FOR:
        return BAD_FOR[opt_name, name]
    if default is None and name in OPTIONAL_KIND:
        return [(v, shown) for v, shown in bad_values(opt_name, name, OPTIONAL_KIND[name]) if v is not None]
    if isinstance(default, bool):
        out = list(BAD_BOOL)
    elif isinstance(default, str):
        out = list(BAD_STR)
    elif isinstance(default, tuple):   # pairs, or triples (Muon's coefficients, Adan's betas)
        out = [(v, shown) for v, shown in BAD_BETAS if not (isinstance(v, tuple) and len(v) == len(default)
                                                            and v == (0.9, 0.99, 0.9))]   # valid triple
        if len(default) != 2:
            out.append(((0.9, 0.99), (0.9, 0.99)))
    elif isinstance(default, int):
        out = list(BAD_INT)
    elif isinstance(default, float):
        out = list(BAD_REAL)
    elif default is None and (opt_name, name) in EXTRA_FOR:   # optional: None means "derived"
        out = []
    else:
        raise AssertionError(f"no bad values known for {opt_name}.{name}={default!r}: add them here")
    ok = VALID_FOR.get((opt_name, name), []) + VALID.get(name, [])
    out = [(v, shown) for v, shown in out if not any(v == x for x in ok)]
    return out + EXTRA.get(name, []) + EXTRA_FOR.get((opt_name, name), [])


# the signature's hyperparameters (not keywords that only rename one, e.g. Adafactor's clip_threshold)
HYPERPARAMETERS = [pytest.param(i, name, default, id=f"{i.name}-{name}")
                   for i in INFOS for name, default in i.defaults.items() if name in i.cls._constraints()]


def fresh_params(n=2):
    return [torch.randn(3, 2, requires_grad=True) for _ in range(n)]


def assert_names(err, name, shown):
    msg = str(err.value)
    assert re.search(rf"\b{re.escape(name)}\b", msg), f"{name!r} not named in: {msg}"
    assert repr(shown) in msg, f"{shown!r} not shown in: {msg}"


@pytest.mark.parametrize("info,name,default", HYPERPARAMETERS)
def test_bad_hyperparameter_raises(info, name, default):
    cls = info.cls
    for value, shown in bad_values(info.name, name, default):
        # as a keyword argument
        with pytest.raises(ValueError) as err:
            cls(fresh_params(), **{name: value})
        assert_names(err, name, shown)
        # in a param-group dict at construction
        with pytest.raises(ValueError) as err:
            cls([{"params": fresh_params(1)}, {"params": fresh_params(1), name: value}])
        assert_names(err, name, shown)
        # through add_param_group: refused, and nothing added
        opt = cls(fresh_params())
        with pytest.raises(ValueError) as err:
            opt.add_param_group({"params": fresh_params(1), name: value})
        assert_names(err, name, shown)
        assert len(opt.param_groups) == 1


@pytest.mark.parametrize("info,name,default", HYPERPARAMETERS)
def test_good_values_are_accepted(info, name, default):
    """The other side of validation: boundary values that are valid must not be refused."""
    good = {
        "lr": [0.0, 0, 1], "eps": [0.0], "weight_decay": [0.0, 1],
        "betas": [(0.0, 0.0), [0.5, 0.5], (0, 0.999999)], "amp_fac": [0.0],
        "centralization": [-1.0, 0.0, 2.5], "weight_decay_mode": ["coupled", "decoupled", "absolute"],
        "maximize": [True, False], "warmup": [0, 10] if info.name == "adam_warmup" else [1, 10],
        "momentum": [0.0, 0.99], "d_model": [1, 64.0],
    }.get(name, [default])
    if name == "betas" and len(default) != 2:      # Adan, AdEMAMix, CAME: three betas
        good = [(0.0,) * len(default), [0.5] * len(default), (0,) + (0.999999,) * (len(default) - 1)]
    if (info.name, name) == ("adafactor", "eps"):   # torch's (eps1 or None, eps2)
        good = [(0.0, 0.0), (None, 0), [1e-30, 1e-3]]
    for value in good:
        opt = info.cls(fresh_params(), **{name: value})
        opt.add_param_group({"params": fresh_params(1), name: value})


def test_nesterov_needs_momentum_and_no_dampening():
    with pytest.raises(ValueError, match=r"nesterov.*momentum=0\.0"):
        of.SGD(fresh_params(), nesterov=True)
    with pytest.raises(ValueError, match=r"nesterov.*dampening=0\.1"):
        of.SGD(fresh_params(), momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(ValueError, match=r"nesterov.*momentum=0"):
        of.SGD([{"params": fresh_params(1), "momentum": 0}], momentum=0.9, nesterov=True)
    opt = of.SGD(fresh_params(), momentum=0.9, nesterov=True)
    with pytest.raises(ValueError, match=r"nesterov.*momentum=0"):
        opt.add_param_group({"params": fresh_params(1), "momentum": 0})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": fresh_params(1), "momentum": 0, "nesterov": False})  # fine


# ---- bad param groups and keywords -------------------------------------------------------------


def misspell(name):
    return name[:-1] if len(name) > 3 else name + name[-1]


@pytest.mark.parametrize("info,name,default", HYPERPARAMETERS)
def test_unknown_group_key_is_named_with_a_suggestion(info, name, default):
    key = misspell(name)
    for make in (lambda: info.cls([{"params": fresh_params(1), key: default}]),
                 lambda: info.cls(fresh_params()).add_param_group({"params": fresh_params(1), key: default})):
        with pytest.raises(ValueError) as err:
            make()
        msg = str(err.value)
        assert repr(key) in msg
        hint = re.search(r"did you mean (.*?)\?", msg)
        assert hint and repr(name) in hint.group(1), msg


@pytest.mark.parametrize("info", INFOS, ids=lambda i: i.name)
def test_group_keys_torch_understands_but_we_do_not(info):
    """torch's flags are group keys of the optimizers with a torch twin, unknown to the others."""
    for key in ("foreach", "capturable", "differentiable"):
        if key in info.defaults:
            info.cls([{"params": fresh_params(1), key: False}])
            continue
        with pytest.raises(ValueError, match=repr(key)):
            info.cls([{"params": fresh_params(1), key: False}])


@pytest.mark.parametrize("info", INFOS, ids=lambda i: i.name)
def test_group_metadata_is_accepted(info):
    opt = info.cls([{"params": fresh_params(1), "name": "head", "initial_lr": 0.1}])
    assert opt.param_groups[0]["name"] == "head"


@pytest.mark.parametrize("info", INFOS, ids=lambda i: i.name)
def test_unknown_keyword_is_a_type_error(info):
    for key in ("foreach", "lrr", "weight_decay_mod", "momentun", "beta1"):
        if key in info.defaults:
            continue
        with pytest.raises(TypeError, match=key):
            info.cls(fresh_params(), **{key: 0.1})


@pytest.mark.parametrize("info", INFOS, ids=lambda i: i.name)
def test_bad_param_lists(info):
    cls = info.cls
    with pytest.raises(ValueError, match="empty"):
        cls([])
    with pytest.raises(ValueError, match="empty"):
        cls(p for p in [])
    p, q = fresh_params()
    with pytest.raises(ValueError, match="more than one parameter group"):
        cls([{"params": [p]}, {"params": [q, p]}])
    opt = cls([p])
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [q, p]})
    assert len(opt.param_groups) == 1
    with pytest.raises(TypeError):
        cls(p)                                  # a bare tensor, not an iterable of them
    with pytest.raises(ValueError, match="leaf"):
        cls([p * 2])                            # not a leaf
    with pytest.raises(TypeError):
        opt.add_param_group([q])                # not a dict


@pytest.mark.parametrize("info", INFOS, ids=lambda i: i.name)
def test_a_parameter_listed_twice_is_refused_naming_it(info):
    """torch only warns about a duplicate within a group, and then the foreach path updates
    it twice and a fused kernel once: refused, at construction and in add_param_group, naming
    both places; across groups too (torch refuses without saying which)."""
    p, q = fresh_params()
    r, s = (torch.nn.Parameter(torch.ones(2, 3)) for _ in range(2))
    twice = r"parameter 2 of param group 0 \({}shape \(2, 3\)\) is parameter 0 of the same group again"
    with pytest.raises(ValueError, match=twice.format("")):
        info.cls([r, p, r])
    with pytest.raises(ValueError, match=twice.format("'b', ")):
        info.cls([("b", r), ("p", p), ("b", r)])
    with pytest.raises(ValueError, match=r"parameter 1 of param group 1 \(shape \(2, 3\)\) is already "
                                         r"parameter 0 of param group 0.*more than one parameter group"):
        info.cls([{"params": [r]}, {"params": [q, r]}])
    opt = info.cls([{"params": [r]}])
    with pytest.raises(ValueError, match=twice.replace("group 0", "group 1").format("")):
        opt.add_param_group({"params": iter([s, p, s])})
    with pytest.raises(ValueError, match=r"parameter 0 of param group 1 \(shape \(2, 3\)\) is already "
                                         r"parameter 0 of param group 0"):
        opt.add_param_group({"params": r})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [p, q]})
    assert [len(g["params"]) for g in opt.param_groups] == [1, 2]


# ---- sparse gradients and complex parameters ---------------------------------------------------


@pytest.mark.parametrize("info", [i for i in INFOS if not i.cls.supports_sparse], ids=lambda i: i.name)
def test_sparse_gradients_are_refused(info):
    """As torch.optim refuses them: a RuntimeError naming the optimizer, nothing changed."""
    emb = torch.nn.Embedding(10, 3, sparse=True)
    before = emb.weight.detach().clone()
    opt = info.cls(emb.parameters())
    emb(torch.tensor([1, 4])).sum().backward()
    assert emb.weight.grad.is_sparse
    with pytest.raises(RuntimeError, match=rf"^{info.cls.__name__} does not support sparse gradients"):
        opt.step()
    assert torch.equal(emb.weight, before)


def test_only_torchs_sparse_optimizers_take_sparse_gradients():
    assert [i.name for i in INFOS if i.cls.supports_sparse] == ["adagrad", "sgd"]   # as torch.optim's


def snapshot(opt):
    return copy.deepcopy(opt.state_dict())


def assert_same_snapshot(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys(), {k: sorted(st) for k, st in a["state"].items()}
    for k, st in a["state"].items():
        assert st.keys() == b["state"][k].keys(), k
        assert all(torch.equal(v, b["state"][k][n]) for n, v in st.items()), k


@pytest.mark.parametrize("info", [i for i in INFOS if not i.cls.supports_sparse], ids=lambda i: i.name)
def test_a_refused_step_changes_nothing(info):
    """A sparse gradient after dense ones, in a later group: the step is refused before any
    group is updated or any state is created (on the first step and mid-run), so the
    optimizer is exactly as before: its state_dict loads, and it goes on as if the refused
    step had never been tried."""
    torch.manual_seed(0)
    c, a = (torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64)) for _ in range(2))
    emb = torch.nn.Embedding(5, 3, sparse=True).double()
    opt = info.cls([{"params": [c]}, {"params": [a, emb.weight]}], **optimizer_kwargs(info.name))
    twin = info.cls([{"params": [c.detach().clone().requires_grad_()]},
                     {"params": [a.detach().clone().requires_grad_(), emb.weight.detach().clone()]}],
                    **optimizer_kwargs(info.name))

    def dense_step(o):                               # the sparse param has no gradient
        (c_, ), (a_, e_) = (g["params"] for g in o.param_groups)
        c_.grad, a_.grad, e_.grad = torch.cos(c_.detach()), torch.cos(a_.detach()), None
        o.step()

    for _ in range(2):                              # the first step, then mid-run
        before, weights = snapshot(opt), [p.detach().clone() for p in (c, a, emb.weight)]
        for p in (c, a):
            p.grad = torch.cos(p.detach())
        emb(torch.tensor([1, 3])).sum().backward()
        with pytest.raises(RuntimeError, match="sparse"):
            opt.step()
        assert_same_snapshot(snapshot(opt), before)
        for name, p, w in zip(("group 0's", "group 1's dense", "the sparse"), (c, a, emb.weight), weights):
            assert torch.equal(p, w), f"{name} param moved by {(p - w).abs().max().item():.3g}"
        info.cls([{"params": [c]}, {"params": [a, emb.weight]}], **optimizer_kwargs(info.name)
                 ).load_state_dict(snapshot(opt))
        dense_step(opt)
        dense_step(twin)
        assert_same_snapshot(snapshot(opt), snapshot(twin))


def complex_loss(z, w):
    target = torch.linspace(-1, 1, z.numel(), dtype=torch.float64).reshape(z.shape) * (1 - 0.5j)
    # bounded below; the cross term couples the real and imaginary parts with w
    return (((z - target).abs() ** 2).sum() + 0.1 * (z.abs() ** 4).sum() + (w**2).sum()
            + 0.1 * (z.real.sum() - z.imag.sum()) * w.sum())


@pytest.mark.parametrize("cls,kwargs", [p for p in optimizer_params() if p.values[0].supports_complex])
def test_complex_params_are_optimized_as_real_pairs(cls, kwargs):
    """As torch's own tests: a complex parameter takes the same path as its view_as_real with
    the real gradients (here from the same loss through view_as_complex)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 3, dtype=torch.complex128, generator=g).requires_grad_()
    w = torch.randn(5, dtype=torch.float64, generator=g).requires_grad_()
    r = torch.view_as_real(z.detach()).clone().requires_grad_()
    w2 = w.detach().clone().requires_grad_()
    kwargs = {**kwargs, "weight_decay": 0.1}
    opt_c, opt_r = cls([z, w], **kwargs), cls([r, w2], **kwargs)
    a, b = [], []
    for _ in range(20):
        for opt, loss in ((opt_c, lambda: complex_loss(z, w)),
                          (opt_r, lambda: complex_loss(torch.view_as_complex(r), w2))):
            opt.zero_grad()
            loss().backward()
        torch.testing.assert_close(torch.view_as_real(z.grad), r.grad, rtol=1e-10, atol=1e-12)
        opt_c.step()
        opt_r.step()
        a.append(torch.cat([torch.view_as_real(z.detach()).flatten(), w.detach()]))
        b.append(torch.cat([r.detach().flatten(), w2.detach()]))
    assert (a[-1] - a[0]).abs().max() > 1e-3
    assert_same_trajectory(a, b)
    assert opt_c.state[z]["step"].item() == 20


@pytest.mark.parametrize("info", [i for i in INFOS if not i.cls.supports_complex], ids=lambda i: i.name)
def test_complex_params_are_refused_where_unsupported(info):
    z = torch.randn(4, 3, dtype=torch.complex64, requires_grad=True)
    before = z.detach().clone()
    opt = info.cls([z], **optimizer_kwargs(info.name))
    (z.abs() ** 2).sum().backward()
    with pytest.raises(ValueError, match=rf"{info.cls.__name__}.*complex"):
        opt.step()
    assert torch.equal(z, before)


def test_compass_is_among_the_refusers():
    assert not of.Compass.supports_complex


@pytest.mark.parametrize("info", [i for i in INFOS if not i.cls.has_kernel()], ids=lambda i: i.name)
def test_fused_refusal_explains_the_algorithm(info):
    """A built-in without a fused path says why in terms of its algorithm, not of the methods
    it implements; an optimizer of your own that writes update() is told what a fused path needs."""
    with pytest.raises(ValueError) as err:
        info.cls([torch.zeros(3, 3, requires_grad=True)], **{**optimizer_kwargs(info.name), "fused": True})
    message = str(err.value)
    assert message.startswith(f"invalid fused=True: {info.cls.__name__} has no fused path: ")
    assert message.endswith("; use fused=False")
    assert "()" not in message and info.cls.no_fused_reason in message


def test_fused_refusal_of_your_own_optimizer():
    class Mine(of.Optimizer):
        def __init__(self, params, lr=0.1, fused=False):
            super().__init__(params, dict(lr=lr, fused=fused))

        def update(self, group, p, g, s, t):
            p.add_(g, alpha=-group["lr"])

    with pytest.raises(ValueError, match=r"Mine has no fused path: its update is not written as "
                                         r"scalars\(\) \+ kernel\(\)"):
        Mine([torch.zeros(2, requires_grad=True)], fused=True)


@pytest.mark.parametrize("name, value", [("step_sizes", (1e-6, 1e50)), ("etas", (0.5, 1e40)), ("lr", 1e39)])
def test_rprop_values_beyond_the_param_dtype_are_refused_before_the_step(name, value):
    """A value the float32 update cannot hold is refused by name before anything changes;
    float64 params take it."""
    wide = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    narrow = torch.nn.Parameter(torch.ones(3))
    opt = of.Rprop([{"params": [wide]}, {"params": [narrow]}], **{name: value})
    wide.grad, narrow.grad = torch.ones(3, dtype=torch.float64), torch.ones(3)
    with pytest.raises(ValueError, match=rf"{name}=.*float32"):
        opt.step()
    assert not opt.state and torch.equal(wide, torch.ones(3, dtype=torch.float64))
    opt.param_groups[1]["params"] = []
    opt.step()
    assert not torch.equal(wide, torch.ones(3, dtype=torch.float64))
