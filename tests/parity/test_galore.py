"""GaLoreAdamW: full 50-step float64 trajectories, rtol 1e-10, against the authors' ``galore-torch``
1.0 (``GaLoreAdamW``), for every ``proj_type``, a rank above some matrices' smaller dim, and
weight decay without bias correction, on an MLP with a tall, a wide and a small matrix (projected)
and three biases (plain AdamW), a new batch every step and the bases refreshed every 4 steps.

Both compute the SVD of the same float32 copy of the gradient, so the runs agree to rounding."""

import importlib
import importlib.util
import sys
import types
import warnings

import pytest
import torch
from torch import nn

import optforge as of
from helpers import assert_moves, assert_same_trajectory

STEPS = 50


def authors_adamw() -> type:
    """galore-torch's ``GaLoreAdamW``, loaded without its package ``__init__`` (which imports
    bitsandbytes for the 8-bit variant: seconds of import time that this test does not need)."""
    spec = importlib.util.find_spec("galore_torch")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("galore-torch is not installed")
    pytest.importorskip("transformers")        # galore_torch/adamw.py imports its version check
    name = "_optforge_test_galore_torch"
    if name not in sys.modules:   # a stand-in package, so the file's relative imports resolve
        pkg = types.ModuleType(name)
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules[name] = pkg
    return importlib.import_module(f"{name}.adamw").AdamW


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def train(model, opt):
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        x = torch.randn(16, 6, generator=gen, dtype=torch.float64)
        y = torch.randn(16, 3, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        out.append(torch.cat([p.detach().flatten() for p in model.parameters()]).clone())
    return out


def groups(model, galore):
    matrices = [p for p in model.parameters() if p.dim() == 2]
    return [{"params": matrices, **galore}, {"params": [p for p in model.parameters() if p.dim() != 2]}]


CASES = {
    "std": dict(rank=2), "std-full-rank": dict(rank=8), "reverse_std": dict(rank=2, proj_type="reverse_std"),
    "right": dict(rank=2, proj_type="right"), "left": dict(rank=2, proj_type="left"),
    "full": dict(rank=2, proj_type="full"),
    "decay-no-bias-correction": dict(rank=3, scale=1.0, weight_decay=0.1, correct_bias=False),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_galore_torch(case):
    authors = authors_adamw()
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.0, correct_bias=True)
    galore = dict(update_proj_gap=4, scale=0.25, proj_type="std")
    for k, v in CASES[case].items():
        (galore if k in ("rank", "update_proj_gap", "scale", "proj_type") else hyper)[k] = v
    ours = train(model := mlp(), of.GaLoreAdamW(groups(model, galore), **hyper))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)     # its AdamW's deprecation notice
        ref_opt = authors(groups(ref := mlp(), galore), **hyper)
    theirs = train(ref, ref_opt)
    assert_moves(ours)
    assert_same_trajectory(ours, theirs)


def test_refresh_steps_and_unrotated_moments():
    """The bases change at steps 1, gap + 1, 2 gap + 1 only, and the moments keep their values
    across a refresh (they are not rotated into the new basis)."""
    model = mlp()
    opt = of.GaLoreAdamW([model[0].weight], lr=1e-2, rank=2, update_proj_gap=3)
    gen = torch.Generator().manual_seed(2)
    changed = []
    for step in range(1, 8):
        model[0].weight.grad = torch.randn(10, 6, generator=gen, dtype=torch.float64)
        st = opt.state.get(model[0].weight, {})
        before = st["projector"].clone() if st else None
        opt.step()
        if before is not None and not torch.equal(before, st["projector"]):
            changed.append(step)
    assert changed == [4, 7]
    st = opt.state[model[0].weight]
    assert st["exp_avg"].shape == (10, 2) and st["projector"].shape == (2 * 6,)


def test_svd_runs_in_float32_for_float64_params():
    model = mlp()
    opt = of.GaLoreAdamW([model[0].weight], rank=2)
    model[0].weight.grad = torch.randn(10, 6, dtype=torch.float64)
    opt.step()
    basis = opt.state[model[0].weight]["projector"]
    assert basis.dtype == torch.float64 and torch.equal(basis, basis.float().double())
