"""Float64 parity with torch.optim: full 50-step trajectories, two param groups, rtol 1e-10."""

import copy

import pytest
import torch

import optforge as of
from helpers import assert_moves, assert_same_trajectory, make_model, trajectory, two_groups

CASES = [
    # (optforge factory, torch factory, kwargs)
    (of.SGD, torch.optim.SGD, dict(lr=0.05)),
    (of.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    (of.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.3)),
    (of.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    (of.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.8, maximize=True)),
    (of.Adam, torch.optim.Adam, dict(lr=1e-2)),
    (of.Adam, torch.optim.Adam, dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, maximize=True)),
    (of.AdamW, torch.optim.AdamW, dict(lr=1e-2)),
    (of.AdamW, torch.optim.AdamW, dict(lr=1e-2, amsgrad=True)),
    (of.AMSGrad, lambda params, **kw: torch.optim.Adam(params, amsgrad=True, **kw), dict(lr=1e-2)),
    (of.Adam, torch.optim.Adam, dict(lr=1e-2, amsgrad=True)),
    (of.RAdam, torch.optim.RAdam, dict(lr=1e-2)),
    (of.RAdam, torch.optim.RAdam, dict(lr=1e-2, betas=(0.9, 0.9))),  # reaches rho_t > 5 at step 6
    (lambda params, **kw: of.RAdam(params, weight_decay_mode="decoupled", **kw),
     lambda params, **kw: torch.optim.RAdam(params, decoupled_weight_decay=True, **kw), dict(lr=1e-2)),
]


# fused=None (the default) runs torch's fused kernel where it computes the same update (SGD
# without dampening, Adam, AdamW, AMSGrad), fused=False the foreach path: both must match.
@pytest.mark.parametrize("fused", [None, False], ids=["default", "foreach"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("ours,theirs,kwargs", CASES, ids=lambda c: repr(c) if isinstance(c, dict) else "")
def test_trajectory_matches_torch(ours, theirs, kwargs, weight_decay, fused):
    model_a, model_b = make_model(), make_model()
    opt_a = ours(two_groups(model_a, kwargs["lr"], weight_decay), fused=fused,
                 **{k: v for k, v in kwargs.items() if k != "lr"})
    opt_b = theirs(two_groups(model_b, kwargs["lr"], weight_decay),
                   **{k: v for k, v in kwargs.items() if k != "lr"}, foreach=False)
    a, b = trajectory(model_a, opt_a), trajectory(model_b, opt_b)
    assert_moves(a)
    assert_same_trajectory(a, b)


def test_adam_state_loads_into_torch_adam():
    """optforge's state_dict is torch's format: torch.optim.Adam resumes it exactly."""
    model_a, model_b = make_model(), make_model()
    opt_a = of.Adam(model_a.parameters(), lr=1e-2)
    trajectory(model_a, opt_a, steps=10)
    model_b.load_state_dict(model_a.state_dict())
    opt_b = torch.optim.Adam(model_b.parameters(), lr=1e-2, foreach=False)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as torch.save/load would
    assert_same_trajectory(trajectory(model_a, opt_a, steps=20), trajectory(model_b, opt_b, steps=20))


def test_torch_adam_state_loads_into_optforge():
    model_a, model_b = make_model(), make_model()
    opt_a = torch.optim.Adam(model_a.parameters(), lr=1e-2, foreach=False)
    trajectory(model_a, opt_a, steps=10)
    model_b.load_state_dict(model_a.state_dict())
    opt_b = of.Adam(model_b.parameters(), lr=1e-2)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as torch.save/load would
    assert_same_trajectory(trajectory(model_a, opt_a, steps=20), trajectory(model_b, opt_b, steps=20))
