"""Shared test helpers: a small float64 model with 4-D, 2-D and 1-D params, and trajectories."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def make_model(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3),      # 4-D weight, 1-D bias
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5),  # 2-D weight
        nn.Tanh(),
        nn.Linear(5, 1),
    )
    return model.to(dtype)


def two_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """Matrices/kernels in one group, everything else in another with other lr and decay."""
    big = [p for p in model.parameters() if p.dim() > 1]
    small = [p for p in model.parameters() if p.dim() <= 1]
    return [
        {"params": big, "lr": lr, "weight_decay": weight_decay},
        {"params": small, "lr": lr * 0.5, "weight_decay": weight_decay * 0.3},
    ]


def batch(seed: int = 1, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 2, 6, 6, generator=g, dtype=dtype)
    y = torch.randn(16, 1, generator=g, dtype=dtype)
    return x, y


def trajectory(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 50,
               loss_fn: Callable | None = None) -> list[torch.Tensor]:
    """Parameters (flattened, concatenated) after each of ``steps`` full-batch steps."""
    x, y = batch(dtype=next(model.parameters()).dtype)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean() if loss_fn is None else loss_fn(model, x, y)
        loss.backward()
        opt.step()
        out.append(torch.cat([p.detach().flatten() for p in model.parameters()]).clone())
    return out


def assert_same_trajectory(a: list[torch.Tensor], b: list[torch.Tensor], rtol: float = 1e-10,
                           atol: float = 1e-12) -> None:
    assert len(a) == len(b)
    for step, (x, y) in enumerate(zip(a, b), start=1):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m, step=step: f"step {step}: {m}")


def assert_moves(traj: list[torch.Tensor]) -> None:
    """Guard against vacuous parity: the parameters must actually change."""
    assert (traj[-1] - traj[0]).abs().max() > 1e-4


#: Per-parameter state that is a 0-d number, not a tensor shaped like the parameter: the step
#: count, and the scalars torch keeps as state (NAdam's mu_product, ASGD's eta and mu).
SCALAR_STATE = frozenset({"step", "mu_product", "eta", "mu"})


# ---- the optimizer table the suites are parametrized over ------------------------------------
# kwargs (besides params) that make each optimizer exercise its state within a few steps; an
# optimizer registered later without an entry here is still tested, with {"lr": 1e-2}.
OPTIMIZER_KWARGS: dict[str, dict] = {
    "sgd": dict(lr=1e-2, momentum=0.9, nesterov=True),
    "momentum_sgd": dict(lr=1e-2, momentum=0.8),
    "adam": dict(lr=1e-2, betas=(0.8, 0.99)),
    "adamw": dict(lr=1e-2),
    "amsgrad": dict(lr=1e-2),
    "radam": dict(lr=1e-2, betas=(0.9, 0.9)),  # rho_t > 5 from step 6: both branches run
    "adabelief": dict(lr=1e-2, betas=(0.9, 0.9)),
    "compass": dict(lr=1e-2, centralization=0.5),
    "adam_warmup": dict(lr=1e-2, warmup=5),
    "noam": dict(lr=0.5, warmup=5, d_model=16),
    "lion": dict(lr=1e-3, betas=(0.9, 0.99)),
    "adopt": dict(lr=1e-2, betas=(0.9, 0.99)),  # step 1 only initializes v
    "ademamix": dict(lr=1e-2, betas=(0.9, 0.99, 0.999), alpha_warmup=5, beta3_warmup=5),
    "schedule_free_sgd": dict(lr=1e-2, warmup_steps=3),
    "schedule_free_adamw": dict(lr=1e-2, warmup_steps=3),
    "lamb": dict(lr=1e-2, clamp_value=1.0),
    "adan": dict(lr=1e-2, betas=(0.9, 0.9, 0.95)),
    "mars": dict(lr=1e-2, betas=(0.9, 0.95), gamma=0.1),
    "adafactor": dict(lr=1e-2, momentum=0.9),  # with the first moment: all state kinds
    "came": dict(lr=1e-2),
    "soap": dict(lr=1e-2, betas=(0.9, 0.95), precondition_frequency=3, max_precond_dim=4),
    "muon": dict(lr=1e-2, momentum=0.9),  # the 1-D params take the AdamW fallback
    "normuon": dict(lr=1e-2, momentum=0.9, beta2=0.9),
    "adam_mini": dict(lr=1e-2, betas=(0.9, 0.99)),   # unnamed params: one block per tensor
    # blocks and inverse roots within a few steps; factors in the param's dtype, like all state
    "shampoo": dict(lr=1e-2, max_preconditioner_dim=8, precondition_frequency=2, epsilon=1e-6,
                    factor_matrix_dtype="param"),
    "prodigy": dict(lr=1.0, d0=1e-3),
    "adadelta": dict(lr=1.0),  # its step is lr times a ratio of running RMS values
    "asgd": dict(lr=0.05, lambd=1.0, t0=3),  # eta decays and averaging starts within a few steps
}


# Optimizers whose param groups read the constructor's lr by design: MARS (as in the official
# code, its 1-D tensors' lr is the group's lr times lr_1d / the constructor's lr). A group of
# theirs equals a fresh optimizer with the same constructor lr and the group's lr in a group.
READS_CONSTRUCTOR_LR = {"mars"}


# Optimizers the generic tables leave out, and why: their checks train with dense gradients and
# a plain ``step()``, over several param groups. These two are checked against torch.optim's by
# tests/parity/test_torch_sparse_lbfgs.py and by torch's own checks (test_torch_optiminfo.py).
NOT_GENERIC = {
    "sparse_adam": "takes sparse gradients only (nn.Embedding(sparse=True)), has no weight decay",
    "lbfgs": "its step needs a closure that it evaluates several times; one param group only",
}


def optimizer_infos(generic: bool = True) -> list:
    """Registry records of every optforge optimizer (subclasses of ``optforge.Optimizer``);
    ``generic``: only those the generic tables can train (not ``NOT_GENERIC``)."""
    import optforge
    from optforge.registry import list_optimizers

    return [i for i in list_optimizers(with_info=True) if issubclass(i.cls, optforge.Optimizer)
            and not (generic and i.name in NOT_GENERIC)]


def optimizer_kwargs(name: str) -> dict:
    return dict(OPTIMIZER_KWARGS.get(name, {"lr": 1e-2}))


def optimizer_params():
    """``pytest.param(cls, kwargs, id=name)`` for every registered optforge optimizer."""
    import pytest

    return [pytest.param(i.cls, optimizer_kwargs(i.name), id=i.name) for i in optimizer_infos()]


def timm_optimizer(module: str, cls: str) -> type:
    """A class from timm's ``optim/<module>.py``, loaded without ``import timm`` (which needs
    torchvision); skips the test when timm or the file is missing."""
    import importlib
    import importlib.util
    import pathlib
    import sys
    import types

    import pytest

    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm is not installed")
    folder = pathlib.Path(next(iter(spec.submodule_search_locations))) / "optim"
    if not (folder / f"{module}.py").exists():
        pytest.skip(f"timm has no optim/{module}.py")
    name = "_optforge_test_timm_optim"
    if name not in sys.modules:   # a stand-in package, so the file's relative imports resolve
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(folder)]
        sys.modules[name] = pkg
    return getattr(importlib.import_module(f"{name}.{module}"), cls)
