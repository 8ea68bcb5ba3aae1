"""Float64 parity with the authors' adabelief-pytorch 0.2.1 (test-only dependency)."""

import pytest

import optforge as of
from helpers import assert_moves, assert_same_trajectory, make_model, trajectory, two_groups

adabelief_pytorch = pytest.importorskip("adabelief_pytorch")

# (optforge kwargs, reference kwargs)
CASES = [
    (dict(), dict()),
    (dict(rectify=False), dict(rectify=False)),
    (dict(rectify=False, amsgrad=True), dict(rectify=False, amsgrad=True)),
    (dict(amsgrad=True), dict(amsgrad=True)),
    (dict(degenerated_to_sgd=False), dict(degenerated_to_sgd=False)),
    (dict(betas=(0.9, 0.9)), dict(betas=(0.9, 0.9))),
    (dict(weight_decay_mode="coupled"), dict(weight_decouple=False)),
    (dict(weight_decay_mode="absolute"), dict(fixed_decay=True)),
    (dict(eps=1e-8, rectify=False), dict(eps=1e-8, rectify=False)),
]


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("ours,theirs", CASES, ids=[str(c[0]) for c in CASES])
def test_trajectory_matches_reference(ours, theirs, weight_decay):
    model_a, model_b = make_model(), make_model()
    opt_a = of.AdaBelief(two_groups(model_a, 1e-2, weight_decay), **ours)
    opt_b = adabelief_pytorch.AdaBelief(two_groups(model_b, 1e-2, weight_decay),
                                        print_change_log=False, **theirs)
    a, b = trajectory(model_a, opt_a), trajectory(model_b, opt_b)
    assert_moves(a)
    assert_same_trajectory(a, b)
