"""The seed's experiment: fit y = 5x + 10 with a Linear(1, 1), full batch, MSE loss.

What is measured: the fitted weight and bias after 175 steps of MomentumSGD(lr=0.01) (the
seed's defaults, momentum 0.9) must be within TOL = 0.01 of (5, 10); and momentum must converge
faster than plain SGD(lr=0.01): a lower loss at step 175 and fewer steps to reach loss < 1e-2.

Why these bounds hold: with x ~ N(0, 1) the loss's Hessian is ~2I, so lr * lambda ~ 0.02.
Heavy-ball momentum 0.9 is then underdamped and contracts the error by sqrt(0.9) ~ 0.949 per
step: ~1e-4 of the initial error (~10) after 175 steps, i.e. ~1e-3 << TOL. Plain SGD contracts
by only 1 - 0.02 per step: ~3 % of the error is left after 175 steps (~0.3 >> TOL).
"""

import pytest
import torch

import optforge as of

STEPS = 175
TOL = 0.01          # absolute, on the weight and on the bias
THRESHOLD = 1e-2    # loss level for steps-to-threshold


def fit(cls, seed: int, steps: int) -> tuple[torch.nn.Linear, list[float]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(100, 1, generator=g)
    y = 5 * x + 10
    torch.manual_seed(seed)
    model = torch.nn.Linear(1, 1)
    opt = cls(model.parameters(), lr=0.01)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(torch.nn.functional.mse_loss(model(x), y).item())  # after the last step
    return model, losses


def steps_to(losses: list[float], level: float) -> int:
    return next((i for i, v in enumerate(losses) if v < level), len(losses))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_momentum_sgd_fits_the_line(seed):
    model, losses = fit(of.MomentumSGD, seed, STEPS)
    assert abs(model.weight.item() - 5) < TOL
    assert abs(model.bias.item() - 10) < TOL
    assert losses[0] > 10  # it started far away


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_momentum_converges_faster_than_sgd(seed):
    _, momentum = fit(of.MomentumSGD, seed, STEPS)
    sgd_model, sgd = fit(of.SGD, seed, STEPS)
    assert momentum[-1] < sgd[-1] / 100
    assert abs(sgd_model.bias.item() - 10) > TOL      # plain SGD is not there yet
    _, sgd_long = fit(of.SGD, seed, 1000)             # ... but does get there: slower, not broken
    assert steps_to(momentum, THRESHOLD) < STEPS < steps_to(sgd_long, THRESHOLD) < 1000


def test_deterministic():
    a, la = fit(of.MomentumSGD, 0, 20)
    b, lb = fit(of.MomentumSGD, 0, 20)
    assert la == lb
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
