"""A tensor lr, of every shape torch.optim accepts ([], [1], [1, 1]), gives exactly the
float-lr trajectory, for every registered optimizer on the foreach and the fused path, with
weight decay in each optimizer's default mode (decoupled decay scales by lr). Other
hyperparameters take Python numbers: tensor betas are refused at construction."""

import pytest
import torch
from conformance_cases import assert_identical, make, make_model, optimizer_kwargs, run, with_paths

from helpers import two_groups

SHAPES = [(), (1,), (1, 1)]


def tensor_groups(groups, shape):
    return [{**g, "lr": torch.full(shape, g["lr"], dtype=torch.float64)} for g in groups]


@pytest.mark.parametrize("info,fused", with_paths())
def test_tensor_lr_follows_float_lr(info, fused):
    lr = optimizer_kwargs(info.name)["lr"]
    model = make_model()
    expected = run(model, make(info, two_groups(model, lr, 0.05), fused=fused), steps=8)
    for shape in SHAPES:
        model = make_model()
        opt = make(info, tensor_groups(two_groups(model, lr, 0.05), shape), fused=fused)
        assert_identical(run(model, opt, steps=8), expected)
        assert opt.param_groups[0]["lr"].shape == shape          # the user's tensor, kept


def test_tensor_lr_changed_in_place_takes_effect():
    """A tensor lr is read at each step: filling it (as schedulers do) changes the next step."""
    from optforge import SGD

    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    lr = torch.tensor([[0.5]], dtype=torch.float64)
    opt = SGD([p], lr=lr)
    for value in (0.5, 0.25):
        lr.fill_(value)
        p.grad = torch.ones(3, dtype=torch.float64)
        before = p.detach().clone()
        opt.step()
        assert torch.equal(before - p.detach(), torch.full((3,), value, dtype=torch.float64))
    assert opt.param_groups[0]["lr"] is lr


@pytest.mark.parametrize("value", [torch.tensor([0.1, 0.2]), torch.tensor(1j), torch.tensor(-0.1)],
                         ids=["two-elements", "complex", "negative"])
def test_bad_tensor_lr_is_refused(value):
    from optforge import Adam

    with pytest.raises(ValueError, match=r"invalid lr="):
        Adam([torch.nn.Parameter(torch.zeros(2))], lr=value)


def test_tensor_betas_are_refused_at_construction():
    """torch.optim.Adam takes tensor betas only for capturable steps (and refuses them with
    foreach=True); optforge steps are not capturable, so it takes numbers."""
    from optforge import Adam

    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"invalid betas\[0\]=tensor\(0\.9000\).*Python number"):
        Adam([p], betas=(torch.tensor(0.9), torch.tensor(0.999)))
    with pytest.raises(ValueError, match=r"invalid betas\[1\]=tensor\(0\.9990\)"):
        Adam([{"params": [p], "betas": (0.9, torch.tensor(0.999))}])
