"""Float64 parity of Prodigy with the official ``prodigyopt`` package (1.1.2; Mishchenko &
Defazio, 2024): 50 full-batch steps. optforge estimates D per param group, the reference once
for all groups, so the two-group model is compared with one reference optimizer per group
(and a one-group model with one reference)."""

import pytest
import torch

from helpers import assert_moves, assert_same_trajectory, batch, make_model, trajectory, two_groups
from optforge.optimizers.prodigy import Prodigy

prodigyopt = pytest.importorskip("prodigyopt")

CASES = [
    pytest.param(dict(), id="defaults"),
    pytest.param(dict(betas=(0.8, 0.99), beta3=0.9, eps=1e-6, d_coef=0.7), id="betas-beta3-dcoef"),
    pytest.param(dict(growth_rate=1.05, use_bias_correction=True), id="growth-biascorr"),
    pytest.param(dict(safeguard_warmup=True, d0=1e-4), id="safeguard-d0"),
    pytest.param(dict(weight_decay_mode="coupled"), id="coupled"),
    pytest.param(dict(betas=(0.0, 0.999)), id="beta1-0"),
]


def reference_kwargs(kwargs):
    """The reference spells weight_decay_mode="coupled" as decouple=False."""
    out = dict(kwargs)
    if out.pop("weight_decay_mode", "decoupled") == "coupled":
        out["decouple"] = False
    return out


def reference_trajectory(model, groups, kwargs, steps=50):
    """One prodigyopt.Prodigy per param group, stepped together."""
    opts = [prodigyopt.Prodigy([g], **reference_kwargs(kwargs)) for g in groups]
    x, y = batch()
    out = []
    for _ in range(steps):
        for o in opts:
            o.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        for o in opts:
            o.step()
        out.append(torch.cat([p.detach().flatten() for p in model.parameters()]).clone())
    return out


@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("kwargs", CASES)
def test_matches_prodigyopt_per_group(kwargs, wd):
    model_a, model_b = make_model(), make_model()
    a = trajectory(model_a, Prodigy(two_groups(model_a, 1.0, wd), **kwargs))
    b = reference_trajectory(model_b, two_groups(model_b, 1.0, wd), kwargs)
    assert_moves(a)
    assert_same_trajectory(a, b)


@pytest.mark.parametrize("kwargs", CASES[:3])
def test_matches_prodigyopt_one_group(kwargs):
    model_a, model_b = make_model(), make_model()
    ours = Prodigy(model_a.parameters(), weight_decay=0.05, **kwargs)
    a = trajectory(model_a, ours)
    b = trajectory(model_b, prodigyopt.Prodigy(model_b.parameters(), weight_decay=0.05,
                                               **reference_kwargs(kwargs)))
    assert_moves(a)
    assert_same_trajectory(a, b)
    assert ours.param_groups[0]["d"] > ours.param_groups[0]["d0"]        # D did grow


def test_fused_is_refused():
    with pytest.raises(ValueError, match="fused"):
        Prodigy(make_model().parameters(), fused=True)
