"""Parameter dtypes, for every registered optimizer: float64, float32 and bfloat16 models train
(no NaN, the loss falls), and the bf16 options keep what plain bf16 rounds away: weight decay
and small updates (``stochastic_rounding``), state decay (``fp32_state``)."""

import copy

import pytest
import torch
from conformance_cases import all_optimizers, flat, make, make_model, mse, via_torch_save, with_paths

import optforge as of
from helpers import SCALAR_STATE, batch
from optforge.precision import stochastic_round_

DTYPES = [pytest.param(d, id=str(d)[6:]) for d in (torch.float64, torch.float32, torch.bfloat16)]


def train(info, dtype, steps=40, fused=False, **options):
    model = make_model(dtype=dtype)
    opt = make(info, model.parameters(), fused=fused)
    if options:
        opt.configure(**options)
    x, y = (t.to(dtype) for t in batch(dtype=torch.float64))
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = mse(model, x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, opt, losses


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("info,fused", with_paths())
def test_trains_in_every_dtype(info, fused, dtype):
    model, opt, losses = train(info, dtype, fused=fused)
    assert all(p.isfinite().all() for p in model.parameters())
    assert all(v.isfinite().all() for st in opt.state.values() for v in st.values())
    assert min(losses[-5:]) < 0.8 * losses[0], losses[::8]
    assert all(v.dtype == p.dtype for p in model.parameters()
               for k, v in opt.state[p].items() if k not in SCALAR_STATE)


@pytest.mark.parametrize("info", all_optimizers())
def test_bf16_with_fp32_state_and_stochastic_rounding_trains(info):
    """With both options a bf16 model trains about as well as a float32 one, its state is
    float32, and a checkpoint keeps it float32 (torch would cast it to bf16)."""
    _, _, ref = train(info, torch.float32)
    model, opt, losses = train(info, torch.bfloat16, fp32_state=True, stochastic_rounding=True)
    assert all(p.dtype == torch.bfloat16 and p.isfinite().all() for p in model.parameters())
    assert min(losses[-5:]) < 0.8 * losses[0], losses[::8]
    assert min(losses[-5:]) < ref[-1] + 0.1 * (ref[0] - ref[-1]), (losses[-1], ref[-1])
    for p in model.parameters():
        assert all(v.dtype == torch.float32 for k, v in opt.state[p].items() if k not in SCALAR_STATE)
    saved = copy.deepcopy(opt.state_dict())
    fresh = make(info, model.parameters()).configure(fp32_state=True)
    fresh.load_state_dict(saved)
    for st, p in zip(saved["state"].values(), model.parameters()):
        for name, v in st.items():
            assert fresh.state[p][name].dtype == v.dtype and torch.equal(fresh.state[p][name], v), name


@pytest.mark.parametrize("options", [dict(stochastic_rounding=True), dict(fp32_state=True),
                                     dict(fp32_state=True, stochastic_rounding=True)],
                         ids=["stochastic_rounding", "fp32_state", "both"])
@pytest.mark.parametrize("info", all_optimizers())
def test_bf16_resume_is_bit_exact(info, options):
    """Save a bf16 run mid-way, load into a fresh optimizer, continue (with the same RNG state
    for stochastic rounding): identical to the uninterrupted run. State the optimizer keeps
    in float32 for a bf16 param (Schedule-Free's iterate z under stochastic_rounding, all of
    it under fp32_state) stays float32 on load, where torch would cast it to bf16."""
    torch.manual_seed(3)
    model, opt, _ = train(info, torch.bfloat16, steps=3, **options)
    saved_model = copy.deepcopy(model.state_dict())
    saved = via_torch_save(opt.state_dict())
    rng = torch.get_rng_state()
    x, y = (t.to(torch.bfloat16) for t in batch(dtype=torch.float64))

    def cont(m, o):
        for _ in range(4):
            o.zero_grad()
            mse(m, x, y).backward()
            o.step()
        return flat(m.parameters())

    want = cont(model, opt)
    resumed = make_model(seed=5, dtype=torch.bfloat16)
    resumed.load_state_dict(saved_model)
    resumed_opt = make(info, resumed.parameters()).configure(**options)
    resumed_opt.load_state_dict(saved)
    for p, st in zip(resumed.parameters(), saved["state"].values()):
        assert {k: v.dtype for k, v in resumed_opt.state[p].items()} == {k: v.dtype for k, v in st.items()}
    torch.set_rng_state(rng)
    got = cont(resumed, resumed_opt)
    assert torch.equal(got, want), (got - want).abs().max().item()


DECAY_NEEDS_GRADIENTS = {
    "prodigy": "decay is scaled by the step size D, which zero gradients never estimate (no step at all)",
    "asgd": "ASGD's own (1 - lambd eta) shrink (lambd=1.0 in its table kwargs) dwarfs the decay "
            "measured here",
}


@pytest.mark.parametrize("info", all_optimizers())
def test_bf16_weight_decay_survives_with_stochastic_rounding(info):
    """Decoupled decay of 1e-5 a step with zero gradients: plain bf16 rounds every step back to
    1.0 (the decay is lost: so it is with fp32_state alone, which rounds to nearest once);
    stochastic rounding follows the float32 decay on average."""
    if info.name in DECAY_NEEDS_GRADIENTS:
        pytest.skip(DECAY_NEEDS_GRADIENTS[info.name])
    def decayed(dtype, **options):
        p = torch.nn.Parameter(torch.ones(8192, dtype=dtype))
        opt = make(info, [p], weight_decay=1e-3, weight_decay_mode="decoupled", lr=1e-2)
        if options:
            opt.configure(**options)
        for _ in range(300):
            p.grad = torch.zeros_like(p)
            opt.step()
        return p.detach().double().mean().item()

    torch.manual_seed(0)
    want = decayed(torch.float32)
    assert want < 1 - 1e-3                                   # it does decay in float32
    assert decayed(torch.bfloat16) == 1.0                    # ... and not at all in plain bf16
    assert decayed(torch.bfloat16, fp32_state=True) == 1.0
    got = decayed(torch.bfloat16, stochastic_rounding=True)
    assert abs(got - want) < 0.1 * (1 - want), (got, want)


def test_bf16_small_updates_survive_with_stochastic_rounding():
    """SGD steps of 1e-3 on a parameter of 1.0 (half a bf16 ulp is 2e-3)."""
    def path(**options):
        p = torch.nn.Parameter(torch.ones(8192, dtype=torch.bfloat16))
        opt = of.SGD([p], lr=1.0).configure(**options)
        for _ in range(100):
            p.grad = torch.full_like(p, 1e-3)
            opt.step()
        return p.detach().double().mean().item()

    torch.manual_seed(0)
    assert path() == 1.0
    assert abs(path(stochastic_rounding=True) - 0.9) < 0.005


def test_bf16_second_moment_decays_with_fp32_state():
    """Adam's v <- 0.999 v is lost in bf16 (a relative change below half an ulp), so after a
    gradient spike v never decays and the steps stay small; fp32_state keeps it decaying."""
    def second_moment(**options):
        p = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
        opt = of.Adam([p], lr=1e-3).configure(**options)
        p.grad = torch.ones_like(p)
        opt.step()
        for _ in range(200):
            p.grad = torch.zeros_like(p)
            opt.step()
        return opt.state[p]["exp_avg_sq"].double().mean().item()

    assert second_moment() == pytest.approx(1e-3, rel=0.01)                 # stuck
    assert second_moment(fp32_state=True) == pytest.approx(1e-3 * 0.999**200, rel=1e-4)


def test_stochastic_rounding_refuses_float16():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    opt = of.AdamW([p]).configure(stochastic_rounding=True)
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="stochastic_rounding supports bfloat16.*float16"):
        opt.step()
    assert not opt.state[p] or opt.state[p]["step"].item() == 0
    opt.configure(stochastic_rounding=False, fp32_state=True)    # float16 takes fp32_state
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float32 and p.dtype == torch.float16


def test_stochastic_round_is_unbiased_and_exact_where_it_can_be():
    torch.manual_seed(0)
    x = torch.tensor([1.0, -3.5, 0.0, float("inf"), float("-inf"), float("nan"), 2.0**-130])
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    stochastic_round_(out, x)
    assert torch.equal(out[:5].float(), x[:5]) and out[5].isnan()          # representable: exact
    assert out[6].float() in (torch.tensor(2.0**-130).bfloat16().float(), 0.0)
    lo, hi = 1.0, 1.0 + 2.0**-7                                              # neighbours in bf16
    for frac in (0.1, 0.5, 0.9):
        v = torch.full((200_000,), lo + frac * (hi - lo))
        r = torch.empty(v.shape, dtype=torch.bfloat16)
        stochastic_round_(r, v)
        assert set(r.float().unique().tolist()) == {lo, hi}
        assert abs(r.double().mean().item() - v[0].item()) < 3e-5
        stochastic_round_(r, -v)                                            # negatives alike
        assert abs(r.double().mean().item() + v[0].item()) < 3e-5
