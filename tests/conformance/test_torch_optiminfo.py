"""The checks torch's own optimizer suite (test/test_optim.py, ``TestOptimRenewed``) runs on
``torch.optim``, run here over every registered optforge optimizer and the Lookahead / SAM
wrappers, with torch's ``OptimizerInfo`` records (see torch_optim_infos.py).

Each test takes one optimizer and one of its inputs (constructor kwargs), on CPU, in float32
and, where the numbers matter, float64. ``KNOWN_FAILURES`` lists what does not pass yet
(strict xfails: a fix turns them into errors until their row is removed); ``DIFFERENCES``
lists where optforge deliberately differs from torch.optim (skipped; docs/reliability.md
says why).
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
import io
import re

import pytest
import torch
from torch.nn import Parameter
from torch_optim_infos import OPTIM_INFOS, OptimizerErrorEnum, co, runs_native_fused

import optforge

CPU = "cpu"
FLOATS = (torch.float32, torch.float64)
COMPLEX_OF = {torch.float32: torch.complex64, torch.float64: torch.complex128}

# Rows: ("optimizer[:input description]", "check id", reason), fnmatch patterns with "|"
# between alternatives; a check id is check[+fused]-dtype[-extras], e.g. "tensor_lr-float32-1"
# ("+fused": the input with torch's fused=True added).
KNOWN_FAILURES: list[tuple[str, str, str]] = [   # strict xfails: remove a row when it passes
]

# Checks an optimizer cannot take by its nature (as torch's own records say of torch's LBFGS and
# SparseAdam: one param group, a closure, no weight decay); skipped.
CANNOT: list[tuple[str, str, str]] = [
    ("lbfgs", "param_groups_*|param_group_with_lrscheduler|add_param_group*|weight_decay_pulls_to_zero*",
     "LBFGS optimizes all parameters as one vector: one param group"),
    ("lbfgs:all optimizer param groups should be with/without names.", "errors",
     "LBFGS refuses a second param group before comparing their names"),
    ("lbfgs", "step_without_grads*", "LBFGS counts its closure evaluations in its state, with or "
     "without gradients"),
    ("lbfgs", "grads_never_inplaced*", "LBFGS.step needs a closure, which computes new gradients"),
    ("lbfgs", "closure_returns_loss*", "LBFGS evaluates the closure several times and returns the "
     "loss of the first evaluation"),
    ("lbfgs", "complex_2d-float32", "L-BFGS on Rosenbrock amplifies float32 rounding of dot products "
     "summed in another order (torch loosens this check for its LBFGS); float64 is checked"),
    ("sparse_adam", "param_groups_weight_decay*|weight_decay_pulls_to_zero*",
     "SparseAdam has no weight decay"),
    ("sparse_adam", "param_groups_lr-*", "SparseAdam refuses lr=0 (as torch's constructor), which this "
     "check gives a group"),
]

# Where optforge deliberately differs from torch.optim (skipped; docs/reliability.md, "torch's
# optimizer tests", says more).
DIFFERENCES: list[tuple[str, str, str]] = [
    ("adafactor|muon:does not support complex parameters", "errors",
     "a complex param is bad input: ValueError (torch: RuntimeError)"),
    ("muon:only support 2D parameters", "errors", "Muon steps non-matrix params with its AdamW fallback"),
    ("lamb", "complex_2d-*", "LAMB's trust ratio is a per-tensor norm: a complex tensor is one tensor, "
     "its real and imaginary parts held apart are two"),
    ("schedule_free_sgd:default", "goes_right_direction-*|complex_2d-*|param_groups_weight_decay-*|"
     "param_group_with_lrscheduler", "the reference's default lr=1.0 diverges on the test's quadratic"),
    ("noam:maximize", "goes_right_direction-*", "Noam's decoupled decay is scaled by the group lr (as "
     "labml's), 50x its warmed-up Adam step here: the decay, not maximize, drives the loss"),
    ("noam:default", "param_groups_lr-*", "Noam's default schedule (warmup 4000, d_model 512) starts "
     "at 1.7e-7 x lr: the loss does not move in float32 within the test's steps"),
    ("adam_warmup", "param_groups_lr-float64", "AdamWarmup keeps labml's 1e-8 lr floor during warmup: a "
     "group with lr=0 moves by 1e-8 per step"),
    ("prodigy", "weight_decay_pulls_to_zero-*", "Prodigy (as the reference) changes nothing while "
     "every gradient is zero, decoupled decay included"),
    ("soap:default", "load_state_across_dtypes-*", "SOAP preconditions rank-deficient gradients: "
     "float32 rounding in their null space is amplified to O(1) steps, so float32 and float64 runs part"),
    ("shampoo", "load_state_across_dtypes-*", "Shampoo's inverse roots of rank-deficient factors "
     "(epsilon 1e-12) amplify float32 rounding in their null space, so float32 and float64 runs part"),
    ("lookahead|sam", "step_hooks*", "the wrapped optimizer is a torch optimizer too: global step "
     "hooks also run around its step"),
    ("sam", "step_without_grads*", "SAM refuses a step without gradients: its perturbation needs them"),
    ("sam", "grads_never_inplaced*", "SAM's closure computes the gradients at the perturbed weights: "
     "p.grad is replaced by design"),
    ("*:a param group cannot have duplicate parameters|duplicate parameters should not occur across*",
     "errors", "a parameter listed twice is a ValueError naming it (torch warns, then steps it twice)"),
    ("*:betas must be either both floats or both Tensors*|betas?0?? as a Tensor is not supported*",
     "errors", "tensor betas are refused at construction (ValueError): optforge has no capturable "
     "step, where torch needs them"),
    ("*:lr as Tensor doesn't work with foreach & not capturable", "errors",
     "a tensor lr works on every path (read as a number at each step), where torch refuses it"),
    ("mars:1-D hyperparameters|amsgrad flipped|default|maximize|nonzero weight_decay|table kwargs|"
     "weight_decay_mode=coupled", "param_groups_lr-*", "MARS (as its authors' code) scales the 1-D "
     "tensors' lr by (group lr) / (constructor lr): a constructor lr of 0 is refused"),
    ("asgd", "step_for_zero_grads-*|weight_decay_pulls_to_zero-*", "ASGD (as torch's) decays the params "
     "by (1 - lambd eta) every step, gradients or not: zero gradients without weight decay still move them"),
    ("rprop", "param_groups_lr-*", "Rprop's lr is only its initial step size (as torch's), clamped into "
     "step_sizes at once: a group with lr=0 moves by step_sizes[0] per step"),
]


@pytest.fixture(autouse=True)
def _deterministic():
    """Seeds the CPU generator only (overrides conftest's): ``torch.manual_seed`` also queues a
    seeding call, with its stack trace, for each accelerator backend not initialized, which
    costs milliseconds per test across this file's thousands of tests."""
    torch.random.default_generator.manual_seed(0)


def _any(patterns: str, text: str) -> bool:
    return any(fnmatch.fnmatchcase(text, p) for p in patterns.split("|"))


def _match(table, name: str, desc: str, check: str):
    """The reason of the first row whose patterns (fnmatch, ``|`` between alternatives) match
    the optimizer, the input's description and the check id (check-dtype[-extras])."""
    for target, check_pattern, reason in table:
        names, _, descs = target.partition(":")
        if _any(names, name) and _any(descs or "*", desc) and _any(check_pattern, check):
            return reason
    return None


def _marks(name: str, desc: str, check: str) -> list:
    why = _match(CANNOT, name, desc, check) or _match(DIFFERENCES, name, desc, check)
    if why:
        return [pytest.mark.skip(reason=why)]
    reason = _match(KNOWN_FAILURES, name, desc, check)
    return [pytest.mark.xfail(strict=True, reason=reason)] if reason else []


def cases(check: str, *, dtypes=(torch.float32,), impls: bool = True, where=lambda info: True,
          extra: tuple = ((),)):
    """``pytest.param(info, kwargs, dtype, *extra)`` for every optimizer ``where`` selects and
    every one of its inputs (with torch's fused=True variants when ``impls``)."""
    out = []
    for info in OPTIM_INFOS:
        if not where(info):
            continue
        if impls:
            inputs = co._get_optim_inputs_including_global_cliquey_kwargs(CPU, None, info,
                                                                         skip=("differentiable",))
        else:
            inputs = info.optim_inputs_func(CPU)
        for inp in inputs:
            if inp.kwargs.get("fused") and not runs_native_fused(info, inp.kwargs):
                continue
            base_desc, _, impl = inp.desc.partition(" & ")
            for dtype in dtypes:
                for more in extra:
                    short = str(dtype).removeprefix("torch.")
                    ident = "-".join([info.name, inp.desc, short, *map(str, more)])
                    check_id = "-".join([check + (f"+{impl}" if impl else ""), short, *map(str, more)])
                    out.append(pytest.param(info, inp.kwargs, dtype, *more, id=ident,
                                            marks=_marks(info.name, base_desc, check_id)))
    return out


def per_optimizer(check: str, where=lambda info: True):
    """``pytest.param(info)`` for tests that build the optimizer with its defaults."""
    return [pytest.param(info, id=info.name, marks=_marks(info.name, "default", check))
            for info in OPTIM_INFOS if where(info)]


# ---- a small problem, as torch's tests use ------------------------------------------------------
def linear(dtype, *, contiguous: bool = True, seed: int = 0):
    """A weight (10, 5) and bias (10), optionally non-contiguous views, and an input (5)."""
    g = torch.Generator().manual_seed(seed)
    if contiguous:
        w, b = torch.randn(10, 5, generator=g, dtype=dtype), torch.randn(10, generator=g, dtype=dtype)
    else:
        w = torch.randn(10, 5, 2, generator=g, dtype=dtype)[..., 0]
        b = torch.randn(10, 2, generator=g, dtype=dtype)[..., 0]
    return [Parameter(w), Parameter(b)], torch.randn(5, generator=g, dtype=dtype)


def loss_of(params, x):
    w, b = params
    return (w.mv(x) + b).pow(2).sum()


def closure_for(opt, params, x):
    def closure():
        opt.zero_grad()
        loss = loss_of(params, x)
        loss.backward()
        return loss
    return closure


def step(info, opt, closure):
    """One step: the gradients, then ``step()`` (``step(closure)`` for SAM, whose closure
    computes the gradients again at the perturbed weights)."""
    loss = closure()
    if info.only_supports_sparse_grads:
        sparsify(opt)
    if info.step_requires_closure:
        return opt.step(closure)
    opt.step()
    return loss


def sparsify(opt):
    """The gradients in sparse layout, for an optimizer that takes no other (SparseAdam), as
    torch's tests convert them."""
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is not None and not p.grad.is_sparse:
                p.grad = p.grad.to_sparse()


def make(info, params, kwargs, **overrides):
    return info.optim_cls(params, **{**copy.deepcopy(kwargs), **overrides})


def grouped(info, groups, kwargs, **defaults):
    """An optimizer over param groups that each carry ``kwargs``; a wrapper's own options
    (Lookahead's k, SAM's rho, ...) go to its constructor."""
    own = {k: v for k, v in kwargs.items() if k in info.wrapper_options}
    per_group = {k: v for k, v in kwargs.items() if k not in own}
    return info.optim_cls([{**copy.deepcopy(per_group), **g} for g in groups], **own, **defaults)


def clone_params(params):
    return [Parameter(p.detach().clone()) for p in params]


def assert_tree_equal(a, b, path="state_dict"):
    """Nested dicts/lists/tuples equal, tensors bitwise (dtype included)."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, sorted(map(str, a)), sorted(map(str, b)))
        for k in a:
            assert_tree_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


# ---- the records themselves ---------------------------------------------------------------------
@pytest.mark.parametrize("info", per_optimizer("infos_leave_out_cliquey_kwargs"))
def test_infos_leave_out_cliquey_kwargs(info):
    for inp in info.optim_inputs_func(CPU):
        assert not {"foreach", "fused", "differentiable"} & set(inp.kwargs), inp.desc


@pytest.mark.parametrize("info,kwargs,dtype", cases("construct"))
def test_construct_and_print(info, kwargs, dtype):
    params, _ = linear(dtype)
    opt = make(info, params, kwargs)
    assert type(opt).__name__ in repr(opt)


def error_cases():
    out = []
    for info in OPTIM_INFOS:
        for err in info.optim_error_inputs_func(CPU, torch.float32):
            desc = err.optimizer_error_input.desc
            marks = _marks(info.name, desc, "errors")
            out.append(pytest.param(info, err, id=f"{info.name}-{desc}", marks=marks))
    return out


def optforge_message(kwargs: dict) -> str:
    """optforge's form of a hyperparameter error: ``invalid NAME=VALUE`` (``NAME[i]`` for an
    entry of a tuple), for one of the given keyword arguments."""
    return "|".join(rf"invalid {re.escape(k)}(\[\d+\])?=" for k in kwargs)


@pytest.mark.parametrize("info,error", error_cases())
def test_errors(info, error):
    """torch's error type; the message matches torch's regex or optforge's own form naming the
    offending hyperparameter and its value."""
    inp = error.optimizer_error_input
    params = inp.params if inp.params is not None else [Parameter(torch.randn(2, 2))]
    pattern = error.error_regex
    if error.error_type is ValueError and inp.kwargs:
        pattern = f"(?:{pattern})|{optforge_message(inp.kwargs)}"
    if issubclass(error.error_type, Warning):
        checker = pytest.warns(error.error_type, match=pattern)
    else:
        checker = pytest.raises(error.error_type, match=pattern)
    if error.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
        with checker:
            info.optim_cls(params, **inp.kwargs)
    else:
        opt = info.optim_cls(params, **inp.kwargs)
        with checker:
            opt.step((lambda: torch.zeros(())) if info.step_requires_closure else None)


# ---- the update goes the right way ------------------------------------------------------------
def _forloop(info, kwargs):
    return {**kwargs, "foreach": False} if "foreach" in info.supported_impls else kwargs


@pytest.mark.parametrize("info,kwargs,dtype,contiguous",
                         cases("goes_right_direction", impls=False, dtypes=FLOATS, extra=((True,),))
                         + cases("goes_right_direction", impls=False, extra=((False,),)))
def test_goes_right_direction(info, kwargs, dtype, contiguous):
    """20 steps (for-loop path) lower the loss (raise it with maximize); in float32 with
    contiguous params also under torch's lr schedulers."""
    with_schedulers = contiguous and dtype == torch.float32
    for make_schedulers in ([], *info.scheduler_inputs) if with_schedulers else ([],):
        params, x = linear(dtype, contiguous=contiguous)
        opt = make(info, params, _forloop(info, kwargs))
        schedulers = [s(opt) for s in make_schedulers]
        closure = closure_for(opt, params, x)
        initial = closure().item()
        for _ in range(20):
            loss = step(info, opt, closure)
            for s in schedulers:
                s.step(loss) if isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau) else s.step()
        final = closure().item()
        if kwargs.get("maximize", False):
            assert final > initial
        else:
            assert final < initial


@pytest.mark.parametrize("info", per_optimizer("param_group_with_lrscheduler"))
def test_param_group_with_lrscheduler(info):
    (w, _), x = linear(torch.float32)
    (w2, _), _ = linear(torch.float32, seed=1)
    for make_schedulers in info.scheduler_inputs:
        params = [Parameter(w.detach().clone()), Parameter(w2.detach().clone())]
        opt = info.optim_cls([{"params": [params[0]]}, {"params": [params[1]], "lr": 0.01}])
        schedulers = [s(opt) for s in make_schedulers]

        def closure(opt=opt, params=params):
            opt.zero_grad()
            loss = (params[0].mv(x) + params[1].mv(x)).pow(2).sum()
            loss.backward()
            return loss

        initial = closure().item()
        for _ in range(20):
            loss = step(info, opt, closure)
            for s in schedulers:
                s.step(loss) if isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau) else s.step()
        assert closure().item() < initial


@pytest.mark.parametrize("info,kwargs,dtype,num_dim",
                         cases("tensor_lr", dtypes=FLOATS, extra=((0,),))
                         + cases("tensor_lr", extra=((1,), (2,))))
def test_tensor_lr(info, kwargs, dtype, num_dim):
    """A tensor lr (0-d, [1], [1, 1]) steps exactly as the same float lr."""
    lr = 1.0 if info.step_requires_closure else 1e-3
    kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
    params, x = linear(dtype)
    params_t = clone_params(params)
    opt = make(info, params, kwargs, lr=lr)
    opt_t = make(info, params_t, kwargs, lr=torch.tensor(lr).reshape([1] * num_dim))
    for _ in range(5):
        step(info, opt, closure_for(opt, params, x))
        step(info, opt_t, closure_for(opt_t, params_t, x))
        for p, q in zip(params, params_t):
            torch.testing.assert_close(p, q)


# ---- sparse and complex ---------------------------------------------------------------------------
def rosenbrock(t):
    return (1 - t[0]) ** 2 + 100 * (t[1] - t[0] ** 2) ** 2


@pytest.mark.parametrize("info,kwargs,dtype", cases("rosenbrock_sparse", impls=False, dtypes=(torch.float64,),
                                                    where=lambda i: i.supports_sparse
                                                    and not i.step_requires_closure))
def test_rosenbrock_sparse(info, kwargs, dtype):
    """Coordinate descent on Rosenbrock with uncoalesced sparse gradients equals the same
    steps with dense gradients, and gets closer to the minimum (farther, with maximize)."""
    kwargs = {**kwargs, **info.metadata_for_sparse[0]}   # torch's settings for this test replace the input's
    start = torch.tensor([1.5, 1.5], dtype=dtype)
    sparse_p, dense_p = Parameter(start.clone()), Parameter(start.clone())
    sparse_opt, dense_opt = make(info, [sparse_p], kwargs), make(info, [dense_p], kwargs)
    for i in range(1800):       # as torch's test: fewer steps may end farther than the start
        # an optimizer of sparse gradients only (SparseAdam) has no dense run to equal
        runs = ((sparse_p, sparse_opt, True),) + (() if info.only_supports_sparse_grads
                                                  else ((dense_p, dense_opt, False),))
        for p, opt, sparse in runs:
            opt.zero_grad()
            loss = rosenbrock(p)
            loss.backward()
            axis = i % 2
            value = p.grad[axis].detach()
            if sparse:   # the coordinate's gradient split in two entries at the same index
                idx = torch.tensor([[axis, axis]])
                p.grad = torch.sparse_coo_tensor(idx, torch.stack([value / 4, value - value / 4]), (2,))
            else:
                p.grad = torch.zeros_like(p).index_fill_(0, torch.tensor(axis), value)
            opt.step()
        if not info.only_supports_sparse_grads:
            torch.testing.assert_close(sparse_p, dense_p, atol=5e-6, rtol=5e-6)
    solution = torch.ones(2, dtype=dtype)
    if kwargs.get("maximize"):   # ascent: away from the minimum
        assert sparse_p.dist(solution) >= start.dist(solution)
    else:
        assert sparse_p.dist(solution) <= start.dist(solution)


@pytest.mark.parametrize("info,kwargs,dtype",
                         cases("complex", dtypes=FLOATS, where=lambda i: i.supports_complex))
def test_complex(info, kwargs, dtype):
    """Complex params step exactly as their view_as_real copies (a real param beside them)."""
    cdtype = COMPLEX_OF[dtype]
    complex_params = [torch.randn(10, 5, dtype=cdtype, requires_grad=True),
                      torch.randn(10, dtype=cdtype, requires_grad=True),
                      torch.randn(10, 5, dtype=dtype, requires_grad=True)]
    real_params = [(torch.view_as_real(p) if p.is_complex() else p).detach().clone().requires_grad_()
                   for p in complex_params]
    opt_c, opt_r = make(info, complex_params, kwargs), make(info, real_params, kwargs)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in real_params]
        loss = torch.randn(())

        def real_closure(grads=grads, loss=loss):
            for p, g in zip(real_params, grads):
                p.grad = g.clone()
            return loss

        def complex_closure(grads=grads, loss=loss):
            for p, g in zip(complex_params, grads):
                p.grad = torch.view_as_complex(g.clone()) if p.is_complex() else g.clone()
            return loss

        step(info, opt_r, real_closure)
        step(info, opt_c, complex_closure)
        for p, r in zip(complex_params, real_params):
            torch.testing.assert_close(torch.view_as_real(p) if p.is_complex() else p, r, rtol=0, atol=0)


@pytest.mark.parametrize("info,kwargs,dtype",
                         cases("complex_2d", dtypes=FLOATS, where=lambda i: i.supports_complex))
def test_complex_2d(info, kwargs, dtype):
    """A complex pair steps as its real and imaginary parts held as two real params."""
    a = torch.randn(2, dtype=COMPLEX_OF[dtype], requires_grad=True)
    re_, im = (t.detach().clone().requires_grad_() for t in (a.real, a.imag))
    opt_c, opt_r = make(info, [a], kwargs), make(info, [re_, im], kwargs)

    def closure_c():
        opt_c.zero_grad()
        loss = rosenbrock(a).abs()
        loss.backward()
        return loss

    def closure_r():
        opt_r.zero_grad()
        loss = rosenbrock(torch.complex(re_, im)).abs()
        loss.backward()
        return loss

    for _ in range(3):
        step(info, opt_c, closure_c)
        step(info, opt_r, closure_r)
        torch.testing.assert_close(a.real, re_)
        torch.testing.assert_close(a.imag, im)


# ---- implementations agree -------------------------------------------------------------------
def _compare_paths(info, kwargs, dtype, flag):
    """torch's protocol: a small MLP plus a 0-d param, 7 steps with the grads of one step set
    to None and a layer frozen for two steps; params and every state entry compared."""
    runs = []
    for value in (False, True):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1),
                                    torch.nn.Sigmoid()).to(dtype)
        scalar = torch.empty((), dtype=dtype, requires_grad=True)
        scalar.grad = torch.rand_like(scalar)
        opt = make(info, [*model.parameters(), scalar], kwargs, **{flag: value})
        runs.append((model, opt))
    x = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype).reshape(3, 2)
    for i in range(7):
        for model, opt in runs:
            if i == 3:
                model[2].requires_grad_(False)
            if i == 5:
                model[2].requires_grad_(True)

            def closure(model=model, opt=opt):
                opt.zero_grad()
                loss = model(x).sum()
                loss.backward()
                return loss

            if i == 2:       # no gradients this step: nothing may change (SAM refuses such a step)
                opt.zero_grad()
                if not info.step_requires_closure:
                    opt.step()
            else:
                step(info, opt, closure)
        (model_a, opt_a), (model_b, opt_b) = runs
        for p, q in zip(model_a.parameters(), model_b.parameters()):
            torch.testing.assert_close(p, q, msg=lambda m, i=i: f"step {i}: {m}")
            for name, value in opt_a.state[p].items():
                torch.testing.assert_close(value, opt_b.state[q][name],
                                           msg=lambda m, i=i, name=name: f"step {i} {name}: {m}")


def _takes_foreach(info) -> bool:
    """torch's ``foreach`` keyword is taken by the classes with a torch.optim counterpart (and
    the wrappers around them); the others have one multi-tensor path and no such flag."""
    params = inspect.signature(info.optim_cls).parameters
    return "foreach" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


@pytest.mark.parametrize("info,kwargs,dtype", cases("foreach_matches_forloop", impls=False, dtypes=FLOATS,
                                                    where=_takes_foreach))
def test_foreach_matches_forloop(info, kwargs, dtype):
    _compare_paths(info, kwargs, dtype, "foreach")


@pytest.mark.parametrize("info,kwargs,dtype", cases("fused_matches_forloop", impls=False, dtypes=FLOATS,
                                                    where=lambda i: "fused" in i.supported_impls))
def test_fused_matches_forloop(info, kwargs, dtype):
    _compare_paths(info, kwargs, dtype, "fused")


# ---- param groups ------------------------------------------------------------------------------
@pytest.mark.parametrize("info,kwargs,dtype", cases("param_groups_weight_decay"))
def test_param_groups_weight_decay(info, kwargs, dtype):
    """A group with the input's weight decay beside one without: the loss moves the right way."""
    (w, _), x = linear(dtype)
    (w2, _), _ = linear(dtype, seed=1)
    opt = grouped(info, [{"params": [w]}, {"params": [w2], "weight_decay": 0.0}], kwargs)

    def closure():
        opt.zero_grad()
        loss = (w.mv(x) + w2.mv(x)).pow(2).sum()
        loss.backward()
        return loss

    initial = closure().item()
    for _ in range(12):
        loss = step(info, opt, closure)
    assert (loss.item() > initial) if kwargs.get("maximize", False) else (loss.item() < initial)


@pytest.mark.parametrize("info,kwargs,dtype", cases("weight_decay_pulls_to_zero", dtypes=FLOATS))
def test_weight_decay_pulls_to_zero(info, kwargs, dtype):
    """With zero gradients, a group with weight decay shrinks towards 0; one without stays."""
    decayed, kept = Parameter(torch.randn(4, 3, dtype=dtype)), Parameter(torch.randn(4, 3, dtype=dtype))
    start = [decayed.detach().clone(), kept.detach().clone()]
    groups = [{"params": [decayed], "weight_decay": 0.1}, {"params": [kept], "weight_decay": 0.0}]
    opt = grouped(info, groups, kwargs)

    def closure():
        for p in (decayed, kept):
            p.grad = torch.zeros_like(p)
        return torch.zeros(())

    for _ in range(5):
        step(info, opt, closure)
    assert decayed.norm() < start[0].norm()
    assert torch.equal(kept, start[1])


@pytest.mark.parametrize("info,kwargs,dtype", cases("param_groups_lr", dtypes=FLOATS))
def test_param_groups_lr(info, kwargs, dtype):
    """A group whose lr is 0 never moves, whatever its gradients; the other group's loss
    moves the right way."""
    kwargs = dict(kwargs)
    lr = kwargs.pop("lr", 0) or 1e-3
    params, x = linear(dtype)
    frozen = Parameter(torch.randn(2, 2, dtype=dtype))
    before = frozen.detach().clone()
    opt = grouped(info, [{"params": params, "lr": lr}, {"params": [frozen]}], kwargs, lr=0.0)

    def closure():
        opt.zero_grad()
        loss = loss_of(params, x)
        loss.backward()
        frozen.grad = torch.rand_like(frozen)
        return loss

    initial = closure().item()
    for _ in range(12):
        loss = step(info, opt, closure)
    assert (loss.item() > initial) if kwargs.get("maximize", False) else (loss.item() < initial)
    assert torch.equal(frozen, before)


# ---- steps that must do nothing, and gradients that must not change -------------------------
@pytest.mark.parametrize("info,kwargs,dtype", cases("step_without_grads"))
def test_step_without_grads(info, kwargs, dtype):
    """Params that do not require grad, or have no grad, are left alone and get no state."""
    params = [torch.randn(2, 3, dtype=dtype), Parameter(torch.randn(2, 3, dtype=dtype))]
    before = [p.detach().clone() for p in params]
    opt = make(info, params, kwargs)
    assert opt.step(lambda: torch.ones(1)).item() == 1
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    assert not any(opt.state[p] for p in params if p in opt.state)


def _has_weight_decay(info) -> bool:
    """False only for an optimizer without weight decay (SparseAdam, LBFGS); wrappers pass it on."""
    params = inspect.signature(info.optim_cls).parameters
    return "weight_decay" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


@pytest.mark.parametrize("info,kwargs,dtype", cases("step_for_zero_grads", dtypes=FLOATS))
def test_step_for_zero_grads(info, kwargs, dtype):
    """Zero gradients and no weight decay (forced off: it moves params by itself): the params
    do not move."""
    param = Parameter(torch.randn(5, 1, dtype=dtype))
    before = param.detach().clone()
    opt = make(info, [param], kwargs, **({"weight_decay": 0.0} if _has_weight_decay(info) else {}))

    def closure():
        param.grad = torch.zeros_like(param)
        return torch.ones(())

    for _ in range(3):
        step(info, opt, closure)
    assert torch.equal(param, before)


@pytest.mark.parametrize("info,kwargs,dtype", cases("grads_never_inplaced"))
def test_grads_never_inplaced(info, kwargs, dtype):
    """step() neither replaces ``p.grad`` nor writes into it."""
    params, x = linear(dtype)
    opt = make(info, params, kwargs)
    for _ in range(3):
        opt.zero_grad()
        loss_of(params, x).backward()
        if info.only_supports_sparse_grads:
            sparsify(opt)
        grads = [p.grad for p in params]
        copies = [g.clone() for g in grads]
        versions = [g._version for g in grads]
        opt.step()
        for p, g, c, v in zip(params, grads, copies, versions):
            assert p.grad is g
            assert g._version == v
            assert torch.equal(g.to_dense(), c.to_dense()) if g.is_sparse else torch.equal(g, c)


@pytest.mark.parametrize("info,kwargs,dtype", cases("non_empty_state"))
def test_non_empty_state(info, kwargs, dtype):
    model = torch.nn.Linear(5, 5, bias=False).to(dtype)
    opt = make(info, model.parameters(), kwargs)
    x = torch.rand(2, 5, dtype=dtype)

    def closure():
        opt.zero_grad()
        loss = model(x).sum()
        loss.backward()
        return loss

    step(info, opt, closure)
    assert opt.state and all(len(st) > 0 for st in opt.state.values())


@pytest.mark.parametrize("info,kwargs,dtype", cases("closure_returns_loss"))
def test_closure_returns_loss(info, kwargs, dtype):
    """step(closure) returns the closure's loss; the closure runs with grad enabled."""
    params, x = linear(dtype)
    opt = make(info, params, kwargs)
    returned, grad_enabled = [], []

    def closure():
        opt.zero_grad()
        grad_enabled.append(torch.is_grad_enabled())
        loss = loss_of(params, x)
        loss.backward()
        if info.only_supports_sparse_grads:
            sparsify(opt)
        returned.append(loss)
        return loss

    if info.step_requires_closure:
        closure()            # SAM: the gradient at the current weights comes first
    with torch.no_grad():
        loss = opt.step(closure)
    assert grad_enabled and all(grad_enabled)
    assert loss is returned[-1]


@pytest.mark.parametrize("info", per_optimizer("zero_grad"))
def test_zero_grad(info):
    params, x = linear(torch.float32)
    opt = info.optim_cls(params)
    loss_of(params, x).backward()
    grads = [p.grad for p in params]
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is g and not g.any() for p, g in zip(params, grads))
    opt.zero_grad()
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("info,kwargs,dtype", cases("add_param_group"))
def test_add_param_group(info, kwargs, dtype):
    """A group added mid-run takes its own lr and steps; the earlier params keep their state;
    a param already in a group is refused."""
    params, x = linear(dtype)
    opt = make(info, params, kwargs)
    step(info, opt, closure_for(opt, params, x))
    state_before = copy.deepcopy(opt.state_dict()["state"])
    extra = Parameter(torch.randn(3, 2, dtype=dtype))
    start = extra.detach().clone()
    opt.add_param_group({"params": [extra], "lr": 0.05})
    assert opt.param_groups[-1]["lr"] == 0.05
    assert_tree_equal(opt.state_dict()["state"], state_before)

    def closure():
        opt.zero_grad()
        loss = loss_of(params, x) + (extra ** 2).sum()
        loss.backward()
        return loss

    for _ in range(8):   # some optimizers only gather statistics at first (ADOPT, SOAP, RAdam)
        step(info, opt, closure)
    assert not torch.equal(extra, start)
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [extra]})


# ---- state_dict -------------------------------------------------------------------------------
def _named(params, named: bool):
    return [(f"name{i}", p) for i, p in enumerate(params)] if named else params


def _primed(info, kwargs, dtype, steps: int, named: bool = False):
    params, x = linear(dtype)
    opt = make(info, _named(params, named), kwargs)
    for _ in range(steps):
        step(info, opt, closure_for(opt, params, x))
    return params, x, opt


@pytest.mark.parametrize("info,kwargs,dtype", cases("state_dict_deterministic", dtypes=FLOATS))
def test_state_dict_deterministic(info, kwargs, dtype):
    """Loaded after 6 steps into a new optimizer over cloned params, the state continues
    bitwise as the original; both state dicts are then equal. (Named params: see
    test_named_state_dict.)"""
    params, x, opt = _primed(info, kwargs, dtype, 6)
    params_c = clone_params(params)
    opt_c = make(info, params_c, kwargs)
    opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(5):
        step(info, opt, closure_for(opt, params, x))
        step(info, opt_c, closure_for(opt_c, params_c, x))
        for p, q in zip(params, params_c):
            assert torch.equal(p, q)
    assert_tree_equal(opt.state_dict(), opt_c.state_dict())
    opt_c.param_groups.extend(opt_c.param_groups)     # repeated params: identical representation
    assert_tree_equal(opt.state_dict()["param_groups"][-1], opt_c.state_dict()["param_groups"][-1])


@pytest.mark.parametrize("info,kwargs,dtype", cases("can_load_older_state_dict"))
def test_can_load_older_state_dict(info, kwargs, dtype):
    """A state dict from before torch added its newer flags (they are deleted) loads and steps."""
    params, x, opt = _primed(info, kwargs, dtype, 3)
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        for flag in info.not_og_supported_flags:
            group.pop(flag, None)
    opt.load_state_dict(old)
    step(info, opt, closure_for(opt, params, x))


@pytest.mark.parametrize("info,kwargs,dtype", cases("named_state_dict"))
def test_named_state_dict(info, kwargs, dtype):
    """State saved with or without param names loads either way; names given to either
    optimizer are kept."""
    for named0, named1 in ((False, True), (True, False), (True, True)):
        params, x, opt = _primed(info, kwargs, dtype, 3, named0)
        opt2 = make(info, _named(params, named1), kwargs)
        opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
        step(info, opt2, closure_for(opt2, params, x))
        assert opt2.state_dict()["param_groups"][0]["param_names"] == ["name0", "name1"]


@pytest.mark.parametrize("info,kwargs,dtype", cases("save_load_weights_only"))
def test_save_load_weights_only(info, kwargs, dtype):
    _, _, opt = _primed(info, kwargs, dtype, 3)
    sd = opt.state_dict()
    for weights_only in (False, True):
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        assert_tree_equal(torch.load(buf, weights_only=weights_only), sd)


@pytest.mark.parametrize("info,kwargs,dtype", cases("load_nontensor_step"))
def test_load_nontensor_step(info, kwargs, dtype):
    """Steps saved as Python numbers (older checkpoints) load, and training continues as if
    they were tensors."""
    params, x, opt = _primed(info, kwargs, dtype, 3)
    params_c = clone_params(params)
    opt_c = make(info, params_c, kwargs)
    sd = copy.deepcopy(opt.state_dict())
    for st in sd["state"].values():
        if torch.is_tensor(st.get("step")):
            st["step"] = st["step"].item()
    opt_c.load_state_dict(sd)
    for _ in range(2):
        step(info, opt, closure_for(opt, params, x))
        step(info, opt_c, closure_for(opt_c, params_c, x))
    for p, q in zip(params, params_c):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("info,kwargs,dtype", cases("load_state_across_dtypes"))
def test_load_state_across_dtypes(info, kwargs, dtype):
    """A float64 run's state loads into the same model in float32: floating state takes the
    params' dtype, steps keep theirs, and training continues close to the float64 run."""
    params, x, opt = _primed(info, kwargs, torch.float64, 3)
    params32 = [Parameter(p.detach().float()) for p in params]
    opt32 = make(info, params32, kwargs)
    opt32.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p in params32:
        for name, value in opt32.state[p].items():
            if torch.is_tensor(value) and value.is_floating_point() and name != "step":
                assert value.dtype == torch.float32, name
    x32 = x.float()
    for _ in range(3):
        step(info, opt, closure_for(opt, params, x))
        step(info, opt32, closure_for(opt32, params32, x32))
    for p, q in zip(params, params32):
        torch.testing.assert_close(q.double(), p, rtol=1e-3, atol=1e-4)


# ---- hooks -------------------------------------------------------------------------------------
@pytest.mark.parametrize("info,kwargs,dtype", cases("state_dict_hooks"))
def test_state_dict_hooks(info, kwargs, dtype):
    """state_dict: a pre hook sees the optimizer before the dict is built, a post hook may
    replace it. load_state_dict: pre hooks edit (or replace) the dict in order, ``prepend``
    puts one first; the post hook runs after the load."""
    params, _ = linear(dtype)

    def pre(optimizer):
        optimizer.state["test"] = 1

    def post(optimizer, sd):
        sd["ran_pre_hook"] = sd["state"].pop("test", None) == 1
        return sd

    opt = make(info, params, kwargs)
    opt.register_state_dict_pre_hook(pre)
    assert opt.state_dict()["state"]["test"] == 1
    opt = make(info, params, kwargs)
    opt.register_state_dict_post_hook(post)
    assert opt.state_dict()["ran_pre_hook"] is False
    opt = make(info, params, kwargs)
    opt.register_state_dict_pre_hook(pre)
    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert sd["ran_pre_hook"] is True and "test" not in sd["state"]

    def set_lr(value, replace):
        def hook(optimizer, sd):
            if replace:
                sd = copy.deepcopy(sd)
            sd["param_groups"][0]["lr"] = value
            return sd if replace else None
        return hook

    def post(optimizer):
        optimizer.state["lr_after_load"] = optimizer.param_groups[0]["lr"]

    opt = make(info, params, kwargs)
    sd = opt.state_dict()
    opt.register_load_state_dict_pre_hook(set_lr(0.002, replace=False))
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.002
    opt.register_load_state_dict_pre_hook(set_lr(0.003, replace=True), prepend=True)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.002      # the prepended hook ran first
    opt = make(info, params, kwargs)
    opt.register_load_state_dict_pre_hook(set_lr(0.003, replace=True))
    opt.register_load_state_dict_post_hook(post)
    opt.load_state_dict(opt.state_dict())
    assert opt.state["lr_after_load"] == 0.003


@pytest.mark.parametrize("info,kwargs,dtype", cases("step_hooks"))
def test_step_hooks(info, kwargs, dtype):
    """Global and local step pre/post hooks run in torch's order; removed hooks do not run."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    params, x = linear(dtype)
    opt = make(info, params, kwargs)
    other = torch.optim.SGD([Parameter(torch.zeros(1))])
    calls = []
    handles = [register_optimizer_step_pre_hook(lambda *a: calls.append("global pre")),
               register_optimizer_step_post_hook(lambda *a: calls.append("global post"))]
    try:
        for o in (opt, other):
            handles.append(o.register_step_pre_hook(lambda *a: calls.append("pre")))
            handles.append(o.register_step_post_hook(lambda *a: calls.append("post")))
        cycle = ["global pre", "pre", "post", "global post"]
        step(info, opt, closure_for(opt, params, x))
        assert calls == cycle
        other.step()
        step(info, opt, closure_for(opt, params, x))
        assert calls == cycle * 3
    finally:
        for h in handles:
            h.remove()
    step(info, opt, closure_for(opt, params, x))
    other.step()
    assert calls == cycle * 3


@pytest.mark.parametrize("info,kwargs,dtype", cases("deepcopy"))
def test_deepcopy_copies_public_attrs(info, kwargs, dtype):
    _, _, opt = _primed(info, kwargs, dtype, 3)
    dup = copy.deepcopy(opt)

    def public(o):
        return {k for k in o.__dict__ if not k.startswith("_")}

    assert public(dup) == public(opt)
    assert_tree_equal(dup.state_dict(), opt.state_dict())


@pytest.mark.parametrize("info", per_optimizer("adamw_serialization",
                                                where=lambda i: i.name in ("adam", "adamw")))
def test_adamw_serialization(info):
    """torch's Adam and AdamW state dicts say ``decoupled_weight_decay``: Adam's is False
    unless loaded from AdamW (then it also decays as AdamW), AdamW's always True."""
    model = torch.nn.Linear(5, 5)
    adam, adamw = optforge.Adam(model.parameters()), optforge.AdamW(model.parameters())
    assert adam.state_dict()["param_groups"][0]["decoupled_weight_decay"] is False
    assert adamw.state_dict()["param_groups"][0]["decoupled_weight_decay"] is True
    old = copy.deepcopy(adamw.state_dict())
    del old["param_groups"][0]["decoupled_weight_decay"]
    for sd in (old, torch.optim.Adam(model.parameters()).state_dict()):
        adamw.load_state_dict(copy.deepcopy(sd))
        assert adamw.param_groups[0]["decoupled_weight_decay"] is True
    # an optforge Adam resumed from torch's AdamW steps as AdamW
    ref = torch.nn.Linear(5, 5)
    ours = copy.deepcopy(ref)
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=0.1, weight_decay=0.5)
    opt = info.optim_cls(ours.parameters(), lr=0.1, weight_decay=0.5)
    opt.load_state_dict(torch_opt.state_dict())
    x = torch.randn(4, 5)
    for model_, opt_ in ((ref, torch_opt), (ours, opt)):
        for _ in range(3):
            opt_.zero_grad()
            model_(x).pow(2).sum().backward()
            opt_.step()
    for p, q in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(q, p)
