"""Property-based fuzzing of hyperparameters (hypothesis), for every registered optimizer:

- a value outside a hyperparameter's declared constraint always raises ValueError naming it,
  and one inside never raises;
- hyperparameters drawn inside their constraints (in ranges a user could mean) never produce
  NaN or inf on a quadratic.

The oracle is written here, independently of optforge.constraints: each constraint is
recognised (by identity, or by the factory that made it) and restated as a predicate."""

from __future__ import annotations

import inspect
import math
import numbers

import pytest
import torch
from conformance_cases import INFOS, optimizer_kwargs

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, database=None)


def _real(v) -> float | None:
    """The float a user's number means, or None if it is not a real number (bools are not)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return None
    try:
        return float(v)
    except OverflowError:            # an int beyond float range: not a usable hyperparameter
        return math.inf if v > 0 else -math.inf


def _factory(check) -> tuple[str, dict]:
    """('beta_tuple', {'n': 2}) for ``beta_tuple(2)``'s check; (name, {}) for plain checks."""
    qual = check.__qualname__
    if ".<locals>." in qual:
        return qual.split(".")[0], inspect.getclosurevars(check).nonlocals
    return check.__name__, {}


def predicate(check):
    kind, args = _factory(check)
    if kind == "optional":
        inner = predicate(args["check"])
        return lambda v: v is None or inner(v)
    if kind == "tensor_or":                  # lr, weight_decay: a one-element real tensor too
        inner = predicate(args["check"])
        return lambda v: (v.numel() == 1 and not v.is_complex() and v.dtype != torch.bool
                          and inner(v.item())) if isinstance(v, torch.Tensor) else inner(v)
    if kind == "tuple_of":
        each = [predicate(c) for c in args["checks"]]
        return lambda v: isinstance(v, (tuple, list)) and len(v) == len(each) and all(
            ok(x) for ok, x in zip(each, v))
    real = lambda v, ok: (x := _real(v)) is not None and ok(x)  # noqa: E731
    preds = {
        "real": lambda v: real(v, math.isfinite),
        "non_negative": lambda v: real(v, lambda x: 0 <= x < math.inf),
        "non_positive": lambda v: real(v, lambda x: -math.inf < x <= 0),
        "positive": lambda v: real(v, lambda x: 0 < x < math.inf),
        "positive_or_inf": lambda v: real(v, lambda x: x > 0),
        "non_negative_or_inf": lambda v: real(v, lambda x: x >= 0),
        "probability": lambda v: real(v, lambda x: 0 <= x <= 1),
        "unit_interval": lambda v: real(v, lambda x: 0 <= x < 1),
        "boolean": lambda v: isinstance(v, bool),
        "only_false": lambda v: v is False,
        "beta_tuple": lambda v: isinstance(v, (tuple, list)) and len(v) == args["n"]
        and all(real(b, lambda x: 0 <= x < 1) for b in v),
        "real_tuple": lambda v: isinstance(v, (tuple, list)) and len(v) == args["n"]
        and all(real(b, math.isfinite) for b in v),
        "integer_at_least": lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)
        and v >= args["low"],
        "one_of": lambda v: any(v == c and type(v) is type(c) for c in args["choices"]),
        "beta_or_minus_one": lambda v: real(v, lambda x: x == -1 or 0 <= x < 1),   # SOAP's shampoo_beta
        "closed_unit_interval": lambda v: real(v, lambda x: 0 <= x <= 1),
        "start_or_minus_one": lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)
        and (v == -1 or v >= 1),                                                   # Shampoo's start step
    }
    if kind not in preds:
        raise AssertionError(f"constraint {kind!r} unknown to the fuzzer: restate it in test_fuzz.py")
    return preds[kind]


def decay_flag_agrees(h):
    """torch's decoupled_weight_decay=True is weight_decay_mode "decoupled" (or None: derived)."""
    return not h["decoupled_weight_decay"] or h["weight_decay_mode"] in (None, "decoupled")


# Rules that span hyperparameters (an optimizer's check_group), restated: a new optimizer with
# a check_group fails test_invalid_values_raise until its rule is added here.
CROSS_RULES = {
    "sgd": lambda h: not h["nesterov"] or (h["momentum"] > 0 and h["dampening"] == 0),
    # only the approximate difference; the fuzzer's params include a 1-D tensor, whose official
    # lr (lr_1d scaled by group lr / lr) needs a constructor lr other than 0
    "mars": lambda h: h["is_approx"] is True and (h["lr"] != 0 or h["optimize_1d"] or h["variant"] == "timm"),
    "adam": decay_flag_agrees,
    "amsgrad": decay_flag_agrees,
    "radam": decay_flag_agrees,
    "nadam": decay_flag_agrees,
    "rprop": lambda h: 0 < h["etas"][0] < 1 < h["etas"][1],
    "shampoo": lambda h: h["start_preconditioning_step"] == -1
    or h["start_preconditioning_step"] >= h["precondition_frequency"],
}


# Valid settings whose NaN is torch.optim's own arithmetic, kept for exact parity (not fuzzed):
# centered RMSprop takes sqrt(v - g_bar^2), which rounding makes negative once the gradient
# stops changing (see RMSprop's docstring).
NAN_AS_IN_TORCH = {"rmsprop": lambda h: h["centered"]}


# Values a constructor takes besides its group's constraint: Adafactor's earlier form eps=e1
# (a number >= 0, or None) is eps=(e1, 1e-3).
CONSTRUCTOR_ALSO = {
    ("adafactor", "eps"): lambda v: v is None or (_real(v) is not None and 0 <= _real(v) < math.inf),
}


def constraints_of(info) -> dict:
    return {name: check for name, check in info.cls._constraints().items() if name in info.defaults}


EDGES = [10**400, -(10**400), 2**63, 5e-324, -0.0, 0.0, 1.0, 0.999999999, 1.0000001, math.nan,
         math.inf, True, None, "", "0.1", "coupled", 1j, (), (0.9,), (0.9, 1.0), (True, 0.9),
         ("0.9", 0.99), (math.nan, 0.9), (10**400, 0.9), [0.5, 0.5], (0.9, 0.99, 0.9)]
ANYTHING = st.one_of(
    st.sampled_from(EDGES),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.tuples(st.floats(allow_nan=True, allow_infinity=True), st.floats(allow_nan=True, allow_infinity=True)),
    st.text(max_size=4),
)
HYPERPARAMETERS = [pytest.param(i, name, id=f"{i.name}-{name}") for i in INFOS
                   for name in sorted(constraints_of(i))]


@pytest.mark.parametrize("info,name", HYPERPARAMETERS)
def test_invalid_values_raise_and_valid_ones_do_not(info, name):
    in_group = predicate(constraints_of(info)[name])
    also = CONSTRUCTOR_ALSO.get((info.name, name), lambda v: False)
    check_value = lambda v: in_group(v) or also(v)  # noqa: E731
    cross = CROSS_RULES.get(info.name, lambda h: True)

    @SETTINGS
    @given(ANYTHING)
    @example(10**400)                        # an int beyond float range once escaped as OverflowError
    @example(-(10**400))
    @example((10**400, 0.5))
    def check(value):
        params = [torch.zeros(2, requires_grad=True)]
        if check_value(value) and cross({**info.defaults, name: value}):
            info.cls(params, **{name: value})
        else:
            with pytest.raises(ValueError, match=rf"\b{name}\b"):
                info.cls(params, **{name: value})

    check()


# ---- valid values never produce NaN -------------------------------------------------------
SANE = {  # ranges a user could mean, per hyperparameter name (else: per constraint)
    "lr": (0.0, 0.1), "eps": (0.0, 1.0), "weight_decay": (0.0, 1.0), "momentum": (0.0, 1.0),
    "dampening": (0.0, 1.0), "amp_fac": (0.0, 10.0), "centralization": (-2.0, 2.0),
    "d_model": (0.01, 1e4), "warmup": (0, 10_000),
    "preconditioner_max_size": (0.0, 100.0), "preconditioner_max_skew": (0.0, 100.0),
}


# Where an optimizer degenerates inside its constraints (found by this fuzzer; see
# docs/reliability.md): the ranges it is fuzzed on instead.
SANE_FOR = {
    # (g - m_t)^2 = beta1^2 (g - m_{t-1})^2: as beta1 -> 0 the belief vanishes and the step
    # becomes lr g / sqrt(eps) (inf with eps = 0, huge with the default 1e-16)
    ("adabelief", "betas"): [(0.5, 1.0), (0.0, 1.0)],
    # steps and decoupled decay are scaled by lr / (1 - beta1^t): beta1 -> 1 blows both up
    ("compass", "betas"): [(0.0, 0.999), (0.0, 1.0)],
}


# Hyperparameters whose valid values are mostly meaningless (any finite triple is a valid
# polynomial, few converge): the values the fuzzer draws from.
SANE_CHOICES = {
    ("muon", "ns_coefficients"): [(3.4445, -4.7750, 2.0315), (1.5, -0.5, 0.0), (2.0, -1.5, 0.5)],
    ("normuon", "ns_coefficients"): [(3.4445, -4.7750, 2.0315), (1.5, -0.5, 0.0), (2.0, -1.5, 0.5)],
    ("rprop", "etas"): [(0.5, 1.2), (0.1, 3.0), (0.99, 1.01)],
    ("rprop", "step_sizes"): [(1e-6, 50.0), (1e-3, 1.0), (0.0, 10.0)],
}


def valid_strategy(name, check, default, opt_name=""):
    kind, args = _factory(check)
    if kind == "optional":
        return st.one_of(st.none(), valid_strategy(name, args["check"], default, opt_name))
    if kind == "tensor_or":
        return valid_strategy(name, args["check"], default, opt_name)
    if kind == "tuple_of":
        return st.tuples(*[valid_strategy(name, c, default, opt_name) for c in args["checks"]])
    if kind == "only_false":
        return st.just(False)
    if kind == "non_positive":
        return st.floats(-1.0, 0.0)
    if kind == "boolean":
        return st.booleans()
    if kind == "one_of":
        return st.sampled_from(args["choices"])
    if kind == "real_tuple":   # e.g. polynomial coefficients: only the meaningful ones are sane
        return st.sampled_from(SANE_CHOICES[(opt_name, name)])
    if kind == "beta_tuple":
        ranges = SANE_FOR.get((opt_name, name), [(0.0, 1.0)] * args["n"])
        return st.tuples(*[st.floats(lo, hi, exclude_max=hi == 1.0) for lo, hi in ranges])
    if kind == "start_or_minus_one":
        return st.one_of(st.just(-1), st.integers(1, 200))
    if kind == "integer_at_least":
        lo, hi = SANE.get(name, (args["low"], args["low"] + 10_000))
        return st.integers(max(lo, args["low"]), hi)
    lo, hi = SANE.get(name, (-1.0, 1.0) if kind == "real" else (0.0, 1.0))
    if kind == "positive_or_inf":
        return st.one_of(st.just(math.inf), st.floats(max(lo, 1e-6), hi))
    if kind == "non_negative_or_inf":
        return st.one_of(st.just(math.inf), st.floats(lo, hi))
    if kind == "positive":
        lo = max(lo, 1e-6)
    return st.floats(lo, hi, exclude_max=kind == "unit_interval")


def valid_hyperparameters(info):
    checks = constraints_of(info)
    keys = sorted(k for k in checks if k != "fused")
    return st.fixed_dictionaries({k: valid_strategy(k, checks[k], info.defaults[k], info.name) for k in keys})


def quadratic_steps(info, hyper, steps=12):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, generator=gen, dtype=torch.float64).requires_grad_()
    b = torch.randn(3, generator=gen, dtype=torch.float64).requires_grad_()
    a = torch.rand(4, 3, generator=gen, dtype=torch.float64) + 0.5          # curvatures in [0.5, 1.5]
    opt = info.cls([w, b], **hyper)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (a * w**2).sum() + ((b - 1) ** 2).sum() + (w.sum(0) * b).sum() * 0.1).backward()
        opt.step()
    return [w, b], opt


@pytest.mark.parametrize("info", [pytest.param(i, id=i.name) for i in INFOS])
def test_valid_hyperparameters_never_produce_nan(info):
    cross = CROSS_RULES.get(info.name, lambda h: True)

    @SETTINGS
    @given(valid_hyperparameters(info))
    def check(hyper):
        hypothesis.assume(cross({**info.defaults, **hyper}))
        hypothesis.assume(not NAN_AS_IN_TORCH.get(info.name, lambda h: False)(hyper))
        params, opt = quadratic_steps(info, hyper)
        bad = [name for name, p in zip("wb", params) if not p.isfinite().all()]
        bad += [f"state[{name}]" for p in params for name, v in opt.state[p].items()
                if torch.is_tensor(v) and not v.isfinite().all()]
        assert not bad, f"non-finite {bad} with {hyper}"

    check()


def test_the_table_hyperparameters_are_valid_by_the_oracle():
    """Keeps the oracle honest: everything the test table uses passes it."""
    for info in INFOS:
        checks = constraints_of(info)
        for name, value in {**info.defaults, **optimizer_kwargs(info.name)}.items():
            if name in checks:     # not keywords that only rename one (Adafactor's clip_threshold)
                assert predicate(checks[name])(value), (info.name, name, value)
