"""Float64 parity of optforge's CAME with the authors' PyPI package ``came-pytorch`` (test-only
dependency; Luo et al., 2023, "CAME: Confidence-guided Adaptive Memory Efficient Optimization"),
over 50 steps with two param groups (4-D, 2-D and 1-D params, weight decay)."""

import copy
import inspect

import pytest
import torch

import optforge as of
from helpers import assert_moves, assert_same_trajectory, make_model, trajectory, two_groups

came_pytorch = pytest.importorskip("came_pytorch")


def ours_kwargs(betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16), clip_threshold=1.0):
    """optforge's kwargs for the reference's: its two eps are two arguments."""
    return dict(betas=betas, eps=eps[0], eps_instability=eps[1],
                clip_threshold=clip_threshold)


@pytest.mark.parametrize("lr,weight_decay,kwargs", [
    (1e-3, 0.0, dict()),                                                  # the reference's defaults
    (2e-4, 1e-2, dict()),                                                 # its README's example
    (3e-3, 0.1, dict(betas=(0.8, 0.99, 0.995), eps=(1e-20, 1e-12), clip_threshold=0.5)),
], ids=["defaults", "readme", "other"])
def test_matches_came_pytorch(lr, weight_decay, kwargs):
    model_a, model_b = make_model(), make_model()
    ref = trajectory(model_a, came_pytorch.CAME(two_groups(model_a, lr, weight_decay), lr=lr, **kwargs))
    ours = trajectory(model_b, of.CAME(two_groups(model_b, lr, weight_decay), lr=lr, **ours_kwargs(**kwargs)))
    assert_moves(ours)
    assert_same_trajectory(ours, ref)


def test_reference_loads_our_state_and_continues_alike():
    """Our per-parameter state has the reference's names and shapes; it ignores the empty
    entries a tensor does not use."""
    model = make_model()
    ours = of.CAME(two_groups(model, 1e-3, 0.1))
    trajectory(model, ours, steps=10)
    probe = make_model()
    own = came_pytorch.CAME(probe.parameters(), lr=1e-3)
    trajectory(probe, own, steps=1)
    for p, q in zip(model.parameters(), probe.parameters()):
        for name, x in own.state[q].items():
            if name not in ("step", "RMS"):          # RMS: written by the reference, never read
                assert ours.state[p][name].shape == x.shape, name
    model_r = copy.deepcopy(model)
    ref = came_pytorch.CAME(two_groups(model_r, 1e-3, 0.1), lr=1e-3)
    saved = copy.deepcopy(ours.state_dict())
    ref.load_state_dict({"state": saved["state"], "param_groups": ref.state_dict()["param_groups"]})
    assert_same_trajectory(trajectory(model_r, ref, steps=10), trajectory(model, ours, steps=10))


def test_defaults_match_reference():
    ref = {n: p.default for n, p in inspect.signature(came_pytorch.CAME).parameters.items()}
    ours = {n: p.default for n, p in inspect.signature(of.CAME).parameters.items()}
    assert ours_kwargs(ref["betas"], ref["eps"], ref["clip_threshold"]) == {
        k: ours[k] for k in ("betas", "eps", "eps_instability", "clip_threshold")}
    assert ours["weight_decay"] == ref["weight_decay"] and ours["weight_decay_mode"] == "decoupled"
    assert ref["lr"] is None and ours["lr"] == 2e-4       # the reference has none; its README uses 2e-4


def test_state_names_by_shape():
    w = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    opt = of.CAME([w, b])
    w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
    opt.step()
    shapes = {n: tuple(x.shape) for n, x in opt.state[w].items() if n != "step"}
    assert shapes == dict(exp_avg=(6, 4), exp_avg_sq_row=(6,), exp_avg_sq_col=(4,), exp_avg_res_row=(6,),
                          exp_avg_res_col=(4,), exp_avg_sq=(0,))
    shapes = {n: tuple(x.shape) for n, x in opt.state[b].items() if n != "step"}
    assert shapes == dict(exp_avg=(4,), exp_avg_sq_row=(0,), exp_avg_sq_col=(0,), exp_avg_res_row=(0,),
                          exp_avg_res_col=(0,), exp_avg_sq=(4,))


def test_fused_and_complex_are_refused():
    with pytest.raises(ValueError, match="fused"):
        of.CAME(make_model().parameters(), fused=True)
    p = torch.nn.Parameter(torch.randn(3, 3, dtype=torch.complex128))
    opt = of.CAME([p])
    p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match="complex"):
        opt.step()
    assert not of.get_optimizer_info("came").elementwise


def repeated_shapes_model(seed: int = 0) -> torch.nn.Module:
    """Convolutions and linear layers of the same shapes, whose statistics optforge computes
    for all tensors of a shape at once."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 2, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(2, 2, 3, padding=1),
        torch.nn.Flatten(), torch.nn.Linear(2 * 6 * 6, 6), torch.nn.Tanh(),
        torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1),
    ).double()


def test_tensors_of_one_shape_match_came_pytorch():
    model_a, model_b = repeated_shapes_model(), repeated_shapes_model()
    ref = trajectory(model_a, came_pytorch.CAME(two_groups(model_a, 1e-3, 0.1), lr=1e-3))
    ours = trajectory(model_b, of.CAME(two_groups(model_b, 1e-3, 0.1), lr=1e-3))
    assert_moves(ours)
    assert_same_trajectory(ours, ref)
