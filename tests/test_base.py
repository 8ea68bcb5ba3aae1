"""The base-class contract, for every optforge optimizer: closure, maximize, params without
gradients, zero_grad, add_param_group, state_dict round trips, weight-decay modes and the
state format."""

import copy
import io

import pytest
import torch

import optforge as of
from helpers import (
    READS_CONSTRUCTOR_LR,
    SCALAR_STATE,
    batch,
    make_model,
    optimizer_kwargs,
    optimizer_params,
    trajectory,
    two_groups,
)

OPTIMIZERS = optimizer_params()


def mse(model, x, y):
    return ((model(x) - y) ** 2).mean()


def flat(params):
    return torch.cat([p.detach().flatten() for p in params]).clone()


def assert_equal_paths(a, b):
    assert len(a) == len(b)
    for step, (x, y) in enumerate(zip(a, b), start=1):
        assert torch.equal(x, y), f"step {step}: max diff {(x - y).abs().max().item()}"


# ---- closure and grad mode ---------------------------------------------------------------------


@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS)
def test_closure_runs_with_grad_and_its_loss_is_returned(cls, kwargs):
    model = make_model()
    opt = cls(model.parameters(), **kwargs)
    x, y = batch()
    calls, update_modes = [], []
    # the methods that update: step_group where the update couples a group's tensors (Prodigy),
    # else update, or fused_update where the default runs torch's fused kernel (Adam, SGD, ...)
    names = ["step_group"] if cls.step_group is not of.Optimizer.step_group else ["update", "fused_update"]

    def spy(update):
        def spied(*args):
            update_modes.append(torch.is_grad_enabled())
            return update(*args)
        return spied

    for name in names:
        setattr(opt, name, spy(getattr(opt, name)))

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = mse(model, x, y)
        loss.backward()
        calls.append(loss)
        return loss

    with torch.no_grad():                       # a closure re-enables grad even then
        returned = opt.step(closure)
    assert calls[0] is True and len(calls) == 2  # run once, with grad
    assert returned is calls[1]
    assert update_modes and not any(update_modes)  # the update itself runs under no_grad

    returned = opt.step()                       # grad enabled outside: the step is not recorded
    assert returned is None
    for p in model.parameters():
        assert p.is_leaf and p.grad_fn is None and p.requires_grad
        for s in opt.state[p].values():
            assert not (torch.is_tensor(s) and (s.requires_grad or s.grad_fn is not None))
    assert opt.step(lambda: 3.5) == 3.5         # any closure result comes back as is


# ---- maximize ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["coupled", "decoupled"])
@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS)
def test_maximize_f_equals_minimizing_minus_f(cls, kwargs, mode):
    """maximize negates the gradient only: weight decay still pulls towards zero."""
    kwargs = {**kwargs, "weight_decay_mode": mode}
    model_a, model_b = make_model(), make_model()
    opt_a = cls(two_groups(model_a, kwargs["lr"], 0.1), **kwargs, maximize=True)
    opt_b = cls(two_groups(model_b, kwargs["lr"], 0.1), **kwargs)
    a = trajectory(model_a, opt_a, steps=20, loss_fn=mse)
    b = trajectory(model_b, opt_b, steps=20, loss_fn=lambda m, x, y: -mse(m, x, y))
    assert (a[-1] - a[0]).abs().max() > 1e-4
    assert_equal_paths(a, b)
    model_c = make_model()                      # and maximizing is not minimizing
    c = trajectory(model_c, cls(two_groups(model_c, kwargs["lr"], 0.1), **kwargs), steps=20)
    assert not torch.equal(a[-1], c[-1])


# ---- params without gradients ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["coupled", "decoupled", "absolute"])
@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS)
def test_params_without_grad_are_skipped(cls, kwargs, mode):
    model = make_model()
    unused = torch.nn.Parameter(torch.ones(4, 3, dtype=torch.float64))
    opt = cls([*model.parameters(), unused], **kwargs, weight_decay=0.1, weight_decay_mode=mode)
    trajectory(model, opt, steps=3)
    assert unused.grad is None
    assert torch.equal(unused, torch.ones(4, 3, dtype=torch.float64))   # not even decayed
    assert unused not in opt.state or not opt.state[unused]

    # a param that had state and loses its gradient for a step: unchanged, step count kept
    weight = model[0].weight
    before, step = weight.detach().clone(), opt.state[weight]["step"].clone()
    other_before = model[2].weight.detach().clone()
    x, y = batch()
    opt.zero_grad()
    mse(model, x, y).backward()
    weight.grad = None
    opt.step()
    assert torch.equal(weight, before)
    assert torch.equal(opt.state[weight]["step"], step)
    assert not torch.equal(model[2].weight, other_before)                  # the others still step


@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS)
def test_zero_grad(cls, kwargs):
    model = make_model()
    opt = cls(model.parameters(), **kwargs)
    x, y = batch()
    mse(model, x, y).backward()
    grads = [p.grad for p in model.parameters()]
    opt.zero_grad(set_to_none=False)
    for p, g in zip(model.parameters(), grads):
        assert p.grad is g and not p.grad.any()            # zeroed in place
    mse(model, x, y).backward()
    opt.zero_grad()                                         # torch's default: set_to_none=True
    assert all(p.grad is None for p in model.parameters())
    mse(model, x, y).backward()
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())


# ---- add_param_group ---------------------------------------------------------------------------


def other_hyperparameters(cls, kwargs):
    """Group overrides that differ from the optimizer's: a larger lr, and other betas/momentum."""
    sig = cls([torch.zeros(1, requires_grad=True)], **kwargs).defaults
    out = {"lr": kwargs["lr"] * 3}
    if "betas" in sig:
        out["betas"] = (0.5, 0.9, 0.95)[:len(sig["betas"])]
    if "momentum" in sig and sig["momentum"] > 0:
        out["momentum"] = 0.5
    return out


@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS)
def test_add_param_group_mid_run(cls, kwargs):
    x, y = batch()
    a, b = make_model(0), make_model(1)
    b_ref, a_ref = copy.deepcopy(b), copy.deepcopy(a)
    opt = cls(a.parameters(), **kwargs)
    for _ in range(5):
        opt.zero_grad()
        mse(a, x, y).backward()
        opt.step()
    new = other_hyperparameters(cls, kwargs)
    opt.add_param_group({"params": list(b.parameters()), **new})
    assert all(opt.param_groups[1][k] == v for k, v in new.items())
    path_b = []
    for _ in range(10):
        opt.zero_grad()
        (mse(a, x, y) + mse(b, x, y)).backward()   # separable: b's gradient depends on b only
        opt.step()
        path_b.append(flat(b.parameters()))

    # the new group takes exactly the steps of a fresh optimizer with its hyperparameters
    if cls.__name__.lower() in READS_CONSTRUCTOR_LR:   # the same constructor lr, the new one in a group
        alone = cls([{"params": b_ref.parameters(), **new}], **kwargs)
    else:
        alone = cls(b_ref.parameters(), **{**kwargs, **new})
    ref = trajectory(b_ref, alone, steps=10, loss_fn=mse)
    assert_equal_paths(path_b, ref)
    # ... and those hyperparameters matter
    b_default = make_model(1)
    other = trajectory(b_default, cls(b_default.parameters(), **kwargs), steps=10, loss_fn=mse)
    assert not torch.equal(other[-1], ref[-1])
    # the first group went on undisturbed
    trajectory(a_ref, ref_opt := cls(a_ref.parameters(), **kwargs), steps=15, loss_fn=mse)
    assert torch.equal(flat(a.parameters()), flat(a_ref.parameters()))
    assert ref_opt.state[next(a_ref.parameters())]["step"].item() == 15


# ---- state_dict --------------------------------------------------------------------------------


def via_torch_save(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS)
def test_state_dict_round_trip_is_bit_identical(cls, kwargs, how):
    lr = kwargs["lr"]
    model = make_model()
    opt = cls(two_groups(model, lr, 0.1), **kwargs)
    trajectory(model, opt, steps=7)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict()) if how == "deepcopy" else via_torch_save(opt.state_dict())
    uninterrupted = trajectory(model, opt, steps=8)

    fresh = make_model(seed=5)
    fresh.load_state_dict(saved_model)
    fresh_opt = cls(two_groups(fresh, lr * 7, 0.0), **kwargs)   # other hyperparameters: restored
    fresh_opt.load_state_dict(saved_opt)
    for g_saved, g_new in zip(saved_opt["param_groups"], fresh_opt.param_groups):
        assert {k: g_new[k] for k in g_saved if k != "params"} == \
               {k: v for k, v in g_saved.items() if k != "params"}
    assert_equal_paths(trajectory(fresh, fresh_opt, steps=8), uninterrupted)
    st = fresh_opt.state[next(fresh.parameters())]["step"]
    assert st.dtype == torch.float32 and st.dim() == 0 and st.item() == 15


@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS)
def test_checkpoint_with_integer_steps_loads(cls, kwargs):
    """Old checkpoints (and some other libraries) store ``step`` as a Python number."""
    model = make_model()
    opt = cls(model.parameters(), **kwargs)
    trajectory(model, opt, steps=4)
    sd = copy.deepcopy(opt.state_dict())
    for st in sd["state"].values():
        st["step"] = int(st["step"].item())
    saved = copy.deepcopy(model.state_dict())
    expected = trajectory(model, opt, steps=3)
    fresh = make_model(seed=5)
    fresh.load_state_dict(saved)
    fresh_opt = cls(fresh.parameters(), **kwargs)
    fresh_opt.load_state_dict(sd)
    assert_equal_paths(trajectory(fresh, fresh_opt, steps=3), expected)


# ---- weight decay modes ------------------------------------------------------------------------


def one_sgd_step(groups_spec):
    """One plain-SGD step on hand-made tensors; returns [(p0, g, p1, spec)]."""
    gen = torch.Generator().manual_seed(3)
    groups, out = [], []
    for spec in groups_spec:
        p = torch.randn(4, 5, dtype=torch.float64, generator=gen).requires_grad_()
        p.grad = torch.randn(4, 5, dtype=torch.float64, generator=gen)
        groups.append({"params": [p], **spec})
        out.append([p.detach().clone(), p.grad.clone(), p, spec])
    of.SGD(groups, lr=0.1).step()
    return [(p0, g, p.detach(), spec) for p0, g, p, spec in out]


def by_hand(mode, p0, g, lr, wd):
    if mode == "coupled":
        return p0 - lr * (g + wd * p0)          # L2: g <- g + wd p
    if mode == "decoupled":
        return p0 * (1 - lr * wd) - lr * g      # p <- p (1 - lr wd)
    if mode == "absolute":
        return p0 * (1 - wd) - lr * g           # p <- p (1 - wd)
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["coupled", "decoupled", "absolute"])
def test_weight_decay_mode_equations(mode):
    [(p0, g, p1, _)] = one_sgd_step([dict(lr=0.3, weight_decay=0.2, weight_decay_mode=mode)])
    torch.testing.assert_close(p1, by_hand(mode, p0, g, 0.3, 0.2), rtol=1e-14, atol=1e-15)
    # for plain SGD coupled and decoupled coincide; absolute (lr != 1) differs from both.
    # Momentum (below) and Adam (further below) tell coupled from decoupled.
    other = "coupled" if mode == "absolute" else "absolute"
    assert (by_hand(other, p0, g, 0.3, 0.2) - p1).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["coupled", "decoupled", "absolute"])
def test_weight_decay_modes_with_momentum_by_hand(mode):
    """Two steps of SGD with momentum and a fixed gradient: only coupled decay enters the
    momentum buffer."""
    lr, wd, mu = 0.1, 0.2, 0.9
    gen = torch.Generator().manual_seed(5)
    p = torch.randn(3, 4, dtype=torch.float64, generator=gen).requires_grad_()
    g = torch.randn(3, 4, dtype=torch.float64, generator=gen)
    p0 = p.detach().clone()
    opt = of.SGD([p], lr=lr, momentum=mu, weight_decay=wd, weight_decay_mode=mode)
    for _ in range(2):
        p.grad = g.clone()
        opt.step()
    shrink = {"coupled": 1.0, "decoupled": 1 - lr * wd, "absolute": 1 - wd}[mode]
    l2 = wd if mode == "coupled" else 0.0
    b1 = g + l2 * p0                            # b_1 = g_1 (+ wd p_0 when coupled)
    p1 = shrink * p0 - lr * b1
    b2 = mu * b1 + g + l2 * p1                  # b_2 = mu b_1 + g_2
    p2 = shrink * p1 - lr * b2
    torch.testing.assert_close(p.detach(), p2, rtol=1e-13, atol=1e-15)


def test_weight_decay_mode_is_per_group():
    specs = [dict(lr=0.3, weight_decay=0.2, weight_decay_mode="coupled"),
             dict(lr=0.05, weight_decay=0.5, weight_decay_mode="decoupled"),
             dict(lr=0.2, weight_decay=0.1, weight_decay_mode="absolute"),
             dict(weight_decay=0.3)]    # the optimizer's default: coupled, lr 0.1
    for p0, g, p1, spec in one_sgd_step(specs):
        expected = by_hand(spec.get("weight_decay_mode", "coupled"), p0, g, spec.get("lr", 0.1),
                           spec["weight_decay"])
        torch.testing.assert_close(p1, expected, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("mode", ["coupled", "decoupled", "absolute"])
def test_weight_decay_modes_in_adams_first_step(mode):
    """Adam's first step is lr * g / (|g| + eps) (bias corrections cancel): by hand."""
    lr, wd, eps = 0.01, 0.3, 1e-8
    gen = torch.Generator().manual_seed(4)
    p = torch.randn(6, dtype=torch.float64, generator=gen).requires_grad_()
    p0 = p.detach().clone()
    p.grad = 0.05 * torch.randn(6, dtype=torch.float64, generator=gen)  # wd p0 can flip its sign
    g = p.grad.clone()
    of.Adam([p], lr=lr, eps=eps, weight_decay=wd, weight_decay_mode=mode).step()
    if mode == "coupled":
        gg = g + wd * p0
        expected = p0 - lr * gg / (gg.abs() + eps)
    else:
        expected = p0 * (1 - (lr * wd if mode == "decoupled" else wd)) - lr * g / (g.abs() + eps)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-15)
    sign_step = p0 - lr * g / (g.abs() + eps)   # what no decay at all would give
    assert (p.detach() - sign_step).abs().max() > 1e-4


def test_adamw_is_adam_with_decoupled_decay():
    model_a, model_b = make_model(), make_model()
    a = trajectory(model_a, of.AdamW(two_groups(model_a, 1e-2, 0.1)))
    b = trajectory(model_b, of.Adam(two_groups(model_b, 1e-2, 0.1), weight_decay_mode="decoupled"))
    assert_equal_paths(a, b)


# ---- state format ------------------------------------------------------------------------------

TORCH_TWINS = {  # optforge name -> torch.optim factory with the same state
    "adam": lambda ps: torch.optim.Adam(ps, foreach=False),
    "adamw": lambda ps: torch.optim.AdamW(ps, foreach=False),
    "amsgrad": lambda ps: torch.optim.Adam(ps, amsgrad=True, foreach=False),
    "radam": lambda ps: torch.optim.RAdam(ps, foreach=False),
    "sgd": lambda ps: torch.optim.SGD(ps, momentum=0.9, foreach=False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS)
def test_state_format(cls, kwargs, dtype):
    model = make_model(dtype=dtype)
    opt = cls(model.parameters(), **kwargs)
    trajectory(model, opt, steps=2)
    group = opt.param_groups[0]
    for p in model.parameters():
        st = opt.state[p]
        step = st["step"]
        assert torch.is_tensor(step) and step.dtype == torch.float32 and step.dim() == 0
        assert step.item() == 2
        for name, s in st.items():
            if name in SCALAR_STATE and name != "step":   # torch's 0-d numbers, in the step's dtype
                assert s.dim() == 0 and s.dtype == step.dtype, name
            elif name != "step":
                shape = opt.state_shape(group, p, name)     # factored state (Adafactor) has its own
                assert s.dtype == p.dtype and s.device == p.device, name
                assert shape is None or tuple(s.shape) == shape, (name, tuple(s.shape), shape)


@pytest.mark.parametrize("name", sorted(TORCH_TWINS))
def test_state_names_match_torch(name):
    info = of.registry.get_optimizer_info(name)
    model_a, model_b = make_model(dtype=torch.float32), make_model(dtype=torch.float32)
    kwargs = {**optimizer_kwargs(name), **({"momentum": 0.9, "nesterov": False} if name == "sgd" else {})}
    ours = info.cls(model_a.parameters(), **kwargs)
    theirs = TORCH_TWINS[name](model_b.parameters())
    trajectory(model_a, ours, steps=1)
    trajectory(model_b, theirs, steps=1)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        sa, sb = ours.state[pa], theirs.state[pb]
        assert set(sb) <= set(sa)                   # torch.optim.SGD keeps no step; we do
        if name != "sgd":
            assert set(sa) == set(sb)
        for k in sb:
            assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k


@pytest.fixture
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def test_step_dtype_follows_torch_under_float64_default(float64_default):
    p = torch.zeros(3, requires_grad=True)
    q = torch.zeros(3, requires_grad=True)
    ours, theirs = of.Adam([p]), torch.optim.Adam([q], foreach=False)
    p.grad, q.grad = torch.ones(3), torch.ones(3)
    ours.step()
    theirs.step()
    assert ours.state[p]["step"].dtype == theirs.state[q]["step"].dtype == torch.float64


# ---- the declaration contract ------------------------------------------------------------------


def test_a_hyperparameter_without_constraint_is_refused():
    class Sloppy(of.Optimizer):
        def __init__(self, params, lr=0.1, gamma=0.5):
            super().__init__(params, dict(lr=lr, gamma=gamma, weight_decay=0.0,
                                          weight_decay_mode="coupled", maximize=False))

    with pytest.raises(TypeError, match="gamma"):
        Sloppy([torch.zeros(1, requires_grad=True)])

