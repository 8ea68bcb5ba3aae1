"""Low-bit state (``state_precision``) for every registered elementwise optimizer, with every
precision: a low-bit step is exactly "decode the state, run the optimizer's own update, encode
it", training with it follows float32 state, and the fused path equals the eager one. (Codes,
memory, checkpoints and errors are in tests/test_lowbit.py.)"""

import copy

import pytest
import torch
from conformance_cases import (
    INFOS,
    all_full,
    assert_identical,
    assert_same_state,
    flat,
    has_fused,
    make,
    make_model,
    run,
    via_torch_save,
)

from optforge.lowbit import PRECISIONS, LowBitState

ELEMENTWISE = [i for i in INFOS if i.elementwise and i.cls.has_kernel()]
LOW_BIT = [pytest.param(i, id=i.name) for i in ELEMENTWISE if not all_full(i)]
FULL_ONLY = [pytest.param(i, id=i.name) for i in ELEMENTWISE if all_full(i)]


def low_bit(info, model, precision, **overrides):
    opt = make(info, model.parameters(), **overrides)
    return opt.configure(state_precision=precision, min_quantized_size=0)


def low_bit_entries(opt):
    return [x for st in opt.state.values() for x in st.values() if isinstance(x, LowBitState)]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("info", LOW_BIT)
def test_a_low_bit_step_is_decode_update_encode(info, precision):
    # fused=False: the decoded twin runs the foreach update (by default Adam & co. would run
    # torch's fused kernel, which rounds differently), as the low-bit step does between codes
    foreach = {"fused": False} if "fused" in info.defaults else {}
    model = make_model()
    opt = low_bit(info, model, precision, **foreach)
    run(model, opt, 3)
    assert low_bit_entries(opt), "the table's model must get low-bit state"
    twin_model = copy.deepcopy(model)
    twin = low_bit(info, twin_model, precision, **foreach)
    twin.load_state_dict(via_torch_save(opt.state_dict()))
    twin.configure(state_precision=None)                    # the same state, decoded
    assert not low_bit_entries(twin)
    before = flat(model.parameters())
    run(model, opt, 1, seed=2)
    run(twin_model, twin, 1, seed=2)
    after = flat(model.parameters())
    assert (after - before).abs().max() > 0
    assert torch.equal(after, flat(twin_model.parameters()))
    twin.configure(state_precision=precision)               # encoded as the low-bit step encodes
    assert_same_state(via_torch_save(twin.state_dict()), via_torch_save(opt.state_dict()))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("info", LOW_BIT)
def test_low_bit_training_follows_float32_state(info, precision):
    start = flat(make_model().parameters())
    full_model, model = make_model(), make_model()
    full = run(full_model, make(info, full_model.parameters()), 20)[-1]
    low = run(model, low_bit(info, model, precision), 20)[-1]
    assert torch.isfinite(low).all()
    distance = ((low - full).norm() / (full - start).norm()).item()
    assert distance < {"bf16": 0.05, "int8": 0.25, "fp8": 0.5, "int4": 1.0}[precision], distance


@pytest.mark.parametrize("info", FULL_ONLY)
def test_state_declared_full_is_left_as_it_is(info):
    """Schedule-Free SGD keeps only its iterate z: low-bit state changes nothing."""
    full_model, model = make_model(), make_model()
    full = run(full_model, make(info, full_model.parameters()), 5)
    opt = low_bit(info, model, "int4")
    assert_identical(run(model, opt, 5), full)
    assert not low_bit_entries(opt)


# a compile each (tests/test_lowbit.py resumes fused AdamW int4); Schedule-Free mixes full and low-bit
# state, AdEMAMix int4 and int8 codes (its slow average)
FUSED_CASES = [("adamw", "int4"), ("schedule_free_adamw", "fp8"), ("ademamix", "int4")]


@pytest.mark.parametrize("name,precision", FUSED_CASES, ids=[f"{n}-{p}" for n, p in FUSED_CASES])
def test_fused_low_bit_equals_eager_low_bit(name, precision):
    """The same codes, the same noise: the paths differ by float rounding only."""
    info = next(i for i in INFOS if i.name == name)
    assert has_fused(info)
    eager_model, fused_model = make_model(), make_model()
    eager = run(eager_model, low_bit(info, eager_model, precision), 5)[-1]
    opt = low_bit(info, fused_model, precision, fused=True)
    fused = run(fused_model, opt, 5)[-1]
    assert low_bit_entries(opt)
    moved = (eager - flat(make_model().parameters())).abs().max()
    torch.testing.assert_close(fused, eager, rtol=0, atol=1e-9 * moved)
