"""Float64 parity of optforge's Lion with the PyPI package ``lion-pytorch`` (test-only
dependency), on eager and fused paths, over 50 steps with two param groups."""

import pytest

import optforge as of
from helpers import assert_moves, assert_same_trajectory, make_model, trajectory, two_groups

lion_pytorch = pytest.importorskip("lion_pytorch")


def run_reference(lr, betas, weight_decay):
    model = make_model()
    return trajectory(model, lion_pytorch.Lion(two_groups(model, lr, weight_decay), lr=lr, betas=betas))


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("lr,betas,weight_decay", [
    (1e-4, (0.9, 0.99), 0.0),          # the reference's defaults
    (3e-3, (0.9, 0.99), 0.5),          # decoupled decay: p *= 1 - lr * wd
    (1e-3, (0.8, 0.95), 0.1),
])
def test_lion_matches_lion_pytorch(lr, betas, weight_decay, fused):
    ref = run_reference(lr, betas, weight_decay)
    model = make_model()
    ours = trajectory(model, of.Lion(two_groups(model, lr, weight_decay), lr=lr, betas=betas, fused=fused))
    assert_moves(ours)
    assert_same_trajectory(ours, ref)


def test_lion_defaults_match_reference():
    import inspect

    ref = inspect.signature(lion_pytorch.Lion).parameters
    ours = inspect.signature(of.Lion).parameters
    for name in ("lr", "betas", "weight_decay"):
        assert ours[name].default == ref[name].default
