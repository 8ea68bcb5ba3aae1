"""State sizes of the factored optimizers (Adafactor, CAME): for an (R, C) matrix the second
moment is R + C numbers (a stack of matrices: R + C per matrix), for a vector it is full size;
first moments are full size. Counted on the state a real step creates."""

import pytest
import torch

import optforge as of


def state_numel(opt, p, names):
    return sum(opt.state[p][n].numel() for n in names)


def stepped(cls, shapes, **kwargs):
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    opt = cls(params, **kwargs)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return opt, params


SHAPES = [(48, 20), (3, 2, 5, 7), (33,), ()]


def second_moment_numel(shape):
    if len(shape) < 2:
        return max(1, torch.Size(shape).numel())
    stack = torch.Size(shape[:-2]).numel()
    return stack * (shape[-2] + shape[-1])        # R + C per matrix


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_adafactor_state_sizes(momentum):
    opt, params = stepped(of.Adafactor, SHAPES, momentum=momentum)
    for p in params:
        shape = tuple(p.shape)
        assert state_numel(opt, p, ("row_var", "col_var", "variance")) == second_moment_numel(shape), shape
        if momentum:
            assert opt.state[p]["exp_avg"].shape == p.shape
        else:
            assert "exp_avg" not in opt.state[p]


def test_came_state_sizes():
    opt, params = stepped(of.CAME, SHAPES)
    for p in params:
        shape = tuple(p.shape)
        assert opt.state[p]["exp_avg"].shape == p.shape
        second = state_numel(opt, p, ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"))
        assert second == second_moment_numel(shape), shape
        instability = state_numel(opt, p, ("exp_avg_res_row", "exp_avg_res_col"))
        assert instability == (second_moment_numel(shape) if len(shape) >= 2 else 0), shape


@pytest.mark.parametrize("cls", [of.Adafactor, of.CAME])
def test_state_survives_a_round_trip_and_refuses_other_shapes(cls):
    opt, params = stepped(cls, [(6, 4), (4,)])
    sd = opt.state_dict()
    fresh = cls(params)
    fresh.load_state_dict(sd)
    for p in params:
        for name, x in opt.state[p].items():
            assert torch.equal(fresh.state[p][name], x), name
    name = "row_var" if cls is of.Adafactor else "exp_avg_sq_row"
    sd["state"][0][name] = torch.zeros(6, 4, dtype=torch.float64)     # a full-size second moment
    with pytest.raises(ValueError, match=rf"state '{name}' of parameter 0 has shape \(6, 4\)"):
        fresh.load_state_dict(sd)
