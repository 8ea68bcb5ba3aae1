"""Float64 parity of Schedule-Free SGD and AdamW with the official ``schedulefree`` package
(Defazio et al., 2024, "The Road Less Scheduled"): 50 full-batch steps on two param groups
(other lr and weight decay), then eval() (parameters -> x) and train() again (-> y)."""

import pytest
import torch

import optforge as of
from helpers import assert_moves, assert_same_trajectory, make_model, trajectory, two_groups

schedulefree = pytest.importorskip("schedulefree")

CASES = [
    pytest.param(of.ScheduleFreeSGD, "SGDScheduleFree", dict(lr=0.05), id="sgd"),
    pytest.param(of.ScheduleFreeSGD, "SGDScheduleFree", dict(lr=0.05, momentum=0.8, warmup_steps=10, r=0.5,
                                                             weight_lr_power=1.0), id="sgd-warmup-r"),
    pytest.param(of.ScheduleFreeAdamW, "AdamWScheduleFree", dict(lr=1e-2), id="adamw"),
    pytest.param(of.ScheduleFreeAdamW, "AdamWScheduleFree",
                 dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, warmup_steps=20, r=1.0, weight_lr_power=3.0),
                 id="adamw-warmup-r"),
]


def x_and_y(model, opt):
    """Parameters after eval() (x) and after train() again (y)."""
    opt.eval()
    x = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
    opt.train()
    y = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
    return [x, y]


@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("cls,ref_name,kwargs", CASES)
def test_matches_schedulefree(cls, ref_name, kwargs, wd):
    ref_cls = getattr(schedulefree, ref_name)
    kwargs = dict(kwargs)
    lr = kwargs.pop("lr")
    model_a, model_b = make_model(), make_model()
    ours = cls(two_groups(model_a, lr, wd), **kwargs)
    ref = ref_cls(two_groups(model_b, lr, wd), **kwargs)
    ref.train()                                       # the reference requires it before stepping
    ours.train()
    a, b = trajectory(model_a, ours), trajectory(model_b, ref)
    assert_moves(a)
    assert_same_trajectory(a, b)
    assert_same_trajectory(x_and_y(model_a, ours), x_and_y(model_b, ref))


def test_step_in_eval_mode_raises_and_modes_round_trip():
    model = make_model()
    opt = of.ScheduleFreeAdamW(model.parameters(), lr=1e-2)
    trajectory(model, opt, steps=3)
    y = [p.detach().clone() for p in model.parameters()]
    opt.eval()
    opt.eval()                                        # idempotent
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), y))
    with pytest.raises(RuntimeError, match="train"):
        opt.step()
    opt.train()
    for p, q in zip(model.parameters(), y):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    state = opt.state_dict()
    assert all(g["train_mode"] for g in state["param_groups"])
