"""The table the conformance suite is parametrized over: every registered optforge optimizer,
with the kwargs from ``helpers.OPTIMIZER_KWARGS`` (``{"lr": 1e-2}`` for one registered later),
so a new optimizer is checked by every test here with no new test code."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from helpers import batch, make_model, optimizer_infos, optimizer_kwargs

INFOS = optimizer_infos()


def has_fused(info) -> bool:
    """Whether the optimizer takes ``fused=True`` with its table kwargs."""
    if "fused" not in info.defaults:
        return False
    try:
        make(info, [torch.zeros(1, requires_grad=True)], fused=True)
    except ValueError:
        return False
    return True


def default_is_native(info) -> bool:
    """Whether ``fused=None`` (the default) runs torch's fused kernel for a float64 CPU bucket
    with the table kwargs (optforge.paths), a path of its own."""
    from optforge.paths import native_by_default

    if "fused" not in info.defaults:
        return False
    opt = make(info, [torch.zeros(1, dtype=torch.float64, requires_grad=True)], fused=None)
    return native_by_default(opt, opt.param_groups[0], (torch.device("cpu"), torch.float64))


def couples_group(info) -> bool:
    """Whether the update couples the tensors of a param group (it overrides ``step_group``,
    as Prodigy's group-wide D estimate does): a tensor's step then depends on its neighbours."""
    import optforge

    return info.cls.step_group is not optforge.Optimizer.step_group


def all_full(info) -> bool:
    """Whether every state of the optimizer is declared "full" (kept in full precision)."""
    kinds = info.cls.state_kinds
    return bool(info.cls.state_names) and all(kinds.get(n) == "full" for n in info.cls.state_names)


def low_bit_capable(info) -> bool:
    """Whether ``state_precision`` stores some of the optimizer's state in low bits."""
    return info.elementwise and info.cls.has_kernel() and not all_full(info)


def all_optimizers():
    return [pytest.param(i, id=i.name) for i in INFOS]


def with_paths():
    """(info, fused) for every optimizer, fused=True where it has a fused path, and fused=None
    where the default runs torch's fused kernel."""
    out = []
    for i in INFOS:
        out.append(pytest.param(i, False, id=f"{i.name}-foreach"))
        if default_is_native(i):
            out.append(pytest.param(i, None, id=f"{i.name}-default"))
        if has_fused(i):
            out.append(pytest.param(i, True, id=f"{i.name}-fused"))
    return out


def fused_optimizers():
    return [pytest.param(i, id=i.name) for i in INFOS if has_fused(i)]


def make(info, params, **overrides):
    return info.cls(params, **{**optimizer_kwargs(info.name), **overrides})


def mse(model, x, y):
    return ((model(x) - y) ** 2).mean()


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in params]).cpu().clone()


def run(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> list[torch.Tensor]:
    """Full-batch steps on the helpers' regression batch; the parameters after each (on CPU,
    wherever the model lives)."""
    p0 = next(model.parameters())
    x, y = (t.to(p0.device) for t in batch(seed=seed, dtype=p0.dtype))
    out = []
    for _ in range(steps):
        opt.zero_grad()
        mse(model, x, y).backward()
        opt.step()
        out.append(flat(model.parameters()))
    return out


def assert_identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for step, (x, y) in enumerate(zip(a, b), start=1):
        assert torch.equal(x, y), f"step {step}: max diff {(x - y).abs().max().item():.3g}"


def state_snapshot(opt: torch.optim.Optimizer) -> dict:
    return copy.deepcopy(opt.state_dict())


def assert_same_state(a: dict, b: dict) -> None:
    """Two state_dicts are equal: same groups, same state entries, tensors bitwise equal."""
    assert a["param_groups"] == b["param_groups"]
    assert sorted(a["state"]) == sorted(b["state"])
    for k in a["state"]:
        sa, sb = a["state"][k], b["state"][k]
        assert sorted(sa) == sorted(sb), k
        for name in sa:
            x, y = sa[name], sb[name]
            pairs = ([(f"{name}.{f}", x[f], y[f]) for f in x] if isinstance(x, dict) and x.keys() == y.keys()
                     else [(name, x, y)])                    # low-bit state: a dict of codes, scales
            for what, u, v in pairs:
                if torch.is_tensor(u):
                    assert u.dtype == v.dtype and torch.equal(u, v), (k, what)
                else:
                    assert u == v, (k, what)


def via_torch_save(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


__all__ = ["INFOS", "all_full", "all_optimizers", "assert_identical", "assert_same_state", "batch",
           "couples_group", "default_is_native", "flat", "fused_optimizers", "has_fused", "low_bit_capable",
           "make", "make_model", "mse", "optimizer_kwargs", "run", "state_snapshot", "via_torch_save",
           "with_paths"]
