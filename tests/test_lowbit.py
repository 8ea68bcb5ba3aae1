"""Low-bit optimizer state (``state_precision``): the codes, memory, checkpoints, options and
errors. Every elementwise optimizer with every precision is in tests/conformance/test_state_precision.py."""

import copy
import importlib
import io
import math
import pickle

import pytest
import torch
from torch import nn

import optforge as of
from optforge.lowbit import CODES, PRECISIONS, LowBitState
from optforge.lowbit.buffers import ChunkBuffers, decode_into, encode_into, in_place
from optforge.lowbit.codes import NOISE_WINDOW, PowerCode, noise_offset, uniform_noise
from optforge.lowbit.state import CHUNK

# ---- the codes -----------------------------------------------------------------------------


def codes_of(precision):
    return [pytest.param(code, kind, id=f"{precision}-{kind}") for kind, code in CODES[precision].items()]


ALL_CODES = [p for precision in PRECISIONS for p in codes_of(precision)]


def sample(kind, n=5000, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.logspace(-3, 1, n)[torch.randperm(n, generator=g)]
    return x.abs() if kind == "non_negative" else x


def block_scale(code, x):
    """The scale of each entry's block, as stored."""
    blocks = torch.cat([x, x.new_zeros(code.padded(x.numel()) - x.numel())]).view(-1, code.block)
    scale = blocks.abs().amax(1, keepdim=True).expand_as(blocks).reshape(-1)[:x.numel()]
    if code.scale_dtype == torch.bfloat16:                  # stored rounded up
        up = torch.nextafter(scale.bfloat16(), torch.tensor(math.inf, dtype=torch.bfloat16)).float()
        scale = torch.where(scale.bfloat16().float() >= scale, scale.bfloat16().float(), up)
    return scale


def level_at(code, x):
    """The gap between the two code values around each entry of ``x``."""
    scale = block_scale(code, x)
    if code.name == "bf16":
        return x.abs() * 2.0**-7                            # one bf16 ulp
    if code.name.startswith("fp8"):
        return torch.maximum(x.abs() * 2.0**-3, scale * 2.0**-9 / 448 * 2)   # one e4m3 step
    k = code.levels                                         # one level of the power code
    y = torch.sqrt(x.abs() / scale) * k if code.power == 2 else x.abs() / scale * k
    return scale * (((y.floor() + 1) / k) ** code.power - (y.floor() / k) ** code.power)


@pytest.mark.parametrize("code,kind", ALL_CODES)
def test_round_trip_error_is_within_one_level(code, kind):
    x = sample(kind)
    back = LowBitState.quantize(code, x, seed=3).dequantize(torch.float32)
    bound = level_at(code, x)
    assert back.shape == x.shape
    assert ((back - x).abs() <= bound * (1 + 1e-5) + 1e-30).all()
    assert (back.sign() * x.sign() >= 0).all()             # never the wrong sign


@pytest.mark.parametrize("code,kind", ALL_CODES)
def test_zeros_and_the_smallest_values(code, kind):
    """Signed: 0 stays 0. Non-negative: nothing reads as 0 in a block that is not all zeros
    (v = 0 under m != 0 would explode m / sqrt(v)); an all-zero block reads as zeros."""
    x = sample(kind)
    x[::7] = 0
    x[-code.padded(1) * 3:] = 0                             # whole zero blocks at the end
    back = LowBitState.quantize(code, x, seed=1).dequantize(torch.float32)
    tail = x.numel() - x.numel() % code.padded(1) - code.padded(1) * 2
    assert (back[tail:] == 0).all()
    if kind == "non_negative" and code.scale_dtype is not None:
        assert (back[:tail] > 0).all()
        assert (back[:tail][x[:tail] == 0] <= level_at(code, x)[:tail][x[:tail] == 0] + 1e-30).all()
    elif kind != "non_negative":
        assert (back[x == 0] == 0).all()


@pytest.mark.parametrize("code,kind", [p for p in ALL_CODES if p.values[0].stochastic])
def test_stochastic_rounding_is_unbiased_and_seeded(code, kind):
    x = sample(kind, n=512)
    draws = torch.stack([LowBitState.quantize(code, x, seed=s).dequantize(torch.float64)
                         for s in range(400)])
    nearest = LowBitState.quantize(code, x, seed=0)
    assert torch.equal(nearest.codes, LowBitState.quantize(code, x, seed=0).codes)   # same seed, same codes
    assert not torch.equal(nearest.codes, LowBitState.quantize(code, x, seed=1).codes)
    spread = level_at(code, x).double() * 0.5 / math.sqrt(len(draws))   # the largest std of the mean
    error = (draws.mean(0) - x.double()).abs()
    if kind == "non_negative" and code.scale_dtype is not None:   # below the smallest level: held
        held = x < block_scale(code, x) / code.levels**code.power     # at it (never 0, see below)
        assert held.float().mean() < 0.6 and (draws[:, held] > 0).all()
        error, spread = error[~held], spread[~held]
    assert (error <= 5 * spread).all()
    assert (error <= 0.5 * spread).float().mean() > 0.3


def test_noise_is_uniform_and_placed_by_seed_and_start():
    cpu = torch.device("cpu")
    offset = noise_offset(7, 0)
    u = uniform_noise(offset, NOISE_WINDOW, cpu)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.005
    assert abs((u[1:] * u[:-1]).mean().item() - 0.25) < 0.005           # neighbours independent
    assert torch.equal(uniform_noise(torch.tensor(offset), 100, cpu), u[:100])   # the compiled form
    offsets = {noise_offset(seed, start) for seed in range(50) for start in range(0, 5 * CHUNK, CHUNK)}
    assert len(offsets) > 240 and noise_offset(7, 0) == offset


@pytest.mark.parametrize("code,kind", [p for p in ALL_CODES if not p.values[0].stochastic])
def test_a_tensor_whose_size_the_block_does_not_divide_is_padded(code, kind):
    x = sample(kind, n=CHUNK + 1001)                        # two chunks, the last block partly used
    q = LowBitState.quantize(code, x, seed=0)
    assert q.codes.numel() == code.code_len(x.numel()) and q.numel == x.numel()
    tail = LowBitState.quantize(code, x[CHUNK:], seed=0)
    assert torch.equal(q.dequantize(torch.float32)[CHUNK:], tail.dequantize(torch.float32))
    if kind != "non_negative":                              # (there, padding reads as the smallest level)
        padding = q.read(CHUNK, x.numel(), torch.float32)[1001:]
        assert torch.equal(padding, torch.zeros(code.padded(1001) - 1001))


EIGHT_BIT = [PowerCode(f"int8-{'s' if signed else 'u'}-p{power}", 8, 256, power, signed, stochastic=False)
             for signed in (True, False) for power in (1, 2)]


@pytest.mark.parametrize("code", EIGHT_BIT, ids=lambda c: c.name)
def test_int8_codes_decode_into_and_encode_from_a_buffer_as_the_code_does(code):
    """The eager step's buffered int8 decode and encode: the code's own numbers, bit for bit."""
    kind = "signed" if code.signed else "non_negative"
    x = torch.cat([sample(kind, n=256 * 20), torch.zeros(256), torch.full((256,), 1e-30),
                   sample(kind, n=256, seed=1) * 1e-6]).contiguous()
    x[:40] = 0                                              # zeros in a non-zero block
    assert in_place(code, torch.float32) and not in_place(code, torch.float64)
    work = torch.full_like(x, float("nan"))
    codes, scales = encode_into(code, x, work)
    want_codes, want_scales = code.encode(x.clone(), None)
    assert torch.equal(codes, want_codes.view(-1)) and torch.equal(scales, want_scales)
    stored = torch.empty(x.numel(), dtype=code.code_dtype).copy_(codes)
    out = torch.full_like(x, float("nan"))
    decode_into(code, stored, scales, out)
    assert torch.equal(out, code.decode(stored, scales, torch.float32).view(-1))


# ---- memory --------------------------------------------------------------------------------


def state_bytes(opt) -> int:
    """Bytes of every storage reachable from the optimizer's state, each counted once: a view
    into a larger buffer counts the whole buffer."""
    seen, total = set(), 0
    for st in opt.state.values():
        for x in st.values():
            tensors = ([x.codes] + ([x.scales] if x.scales is not None else [])
                       if isinstance(x, LowBitState) else [x])
            for t in tensors:
                storage = t.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
    return total


def test_bytes_per_parameter_on_a_1m_parameter_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 128))
    n = sum(p.numel() for p in model.parameters())
    assert n > 1_000_000
    limits = {None: 8.01, "bf16": 4.1, "int8": 2.1, "fp8": 2.1, "int4": 1.1}
    for precision, limit in limits.items():
        opt = of.AdamW(model.parameters(), lr=1e-3)
        opt.configure(state_precision=precision)
        model(torch.randn(4, 1024)).sum().backward()
        opt.step()
        per_param = state_bytes(opt) / n
        assert per_param <= limit, (precision, per_param)
        assert "_flat_buckets" not in opt.__dict__ or precision is None
        saved = sum(x.nbytes for st in opt.state_dict()["state"].values() for v in st.values()
                    for x in (v.values() if isinstance(v, dict) else [v]) if torch.is_tensor(x))
        assert saved == state_bytes(opt)
        model.zero_grad()


def test_switching_on_drops_the_fused_buffers_that_held_the_float32_state():
    model = nn.Linear(256, 64)
    opt = of.MomentumSGD(model.parameters(), fused=True)   # a generated fused kernel, flat buffers
    model(torch.randn(2, 256)).sum().backward()
    opt.step()
    assert opt._flat_buckets
    opt.configure(state_precision="int8", min_quantized_size=0)
    assert "_flat_buckets" not in opt.__dict__
    assert state_bytes(opt) / (256 * 65) < 1.1


def test_small_tensors_and_full_kinds_keep_full_precision():
    big, small = nn.Parameter(torch.randn(64, 64)), nn.Parameter(torch.randn(4095))
    opt = of.AdamW([big, small]).configure(state_precision="int8")
    (big.sum() + small.sum()).backward()
    opt.step()
    assert isinstance(opt.state[big]["exp_avg"], LowBitState)
    assert torch.is_tensor(opt.state[small]["exp_avg"]) and opt.state[small]["exp_avg"].dtype == torch.float32
    opt.configure(min_quantized_size=4095)                  # converted now
    assert isinstance(opt.state[small]["exp_avg_sq"], LowBitState)
    assert opt.param_groups[0]["min_quantized_size"] == 4095

    sf = of.ScheduleFreeAdamW([big]).configure(state_precision="int4")
    sf.step()
    assert torch.is_tensor(sf.state[big]["z"]) and isinstance(sf.state[big]["exp_avg_sq"], LowBitState)


def test_a_slow_average_is_kept_in_int8_under_int4():
    w = nn.Parameter(torch.randn(64, 64))
    w.grad = torch.randn(64, 64)
    opt = of.AdEMAMix([w]).configure(state_precision="int4")
    opt.step()
    codes = {name: x.code for name, x in opt.state[w].items() if name != "step"}
    assert codes["exp_avg_slow"] is CODES["int4"]["slow"] and codes["exp_avg_slow"].bits == 8
    assert codes["exp_avg_fast"].bits == 4 and codes["exp_avg_sq"].bits == 4
    assert {c.block for c in codes.values()} == {64}       # one block size: one fused pass


def test_per_group_precision():
    a, b = nn.Parameter(torch.randn(100, 100)), nn.Parameter(torch.randn(100, 100))
    opt = of.Lion([{"params": [a], "state_precision": "int4"}, {"params": [b]}], lr=1e-3)
    (a.sum() + b.sum()).backward()
    opt.step()
    assert opt.state[a]["exp_avg"].code is CODES["int4"]["sign"]
    assert torch.is_tensor(opt.state[b]["exp_avg"])


# ---- checkpoints ---------------------------------------------------------------------------


def trained(precision, fused=False, steps=3, dtype=torch.float32, **options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(80, 96), nn.Tanh(), nn.Linear(96, 3)).to(dtype)
    opt = of.AdamW(model.parameters(), lr=1e-2, fused=fused).configure(state_precision=precision, **options)
    train(model, opt, steps)
    return model, opt


def train(model, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(16, 80, generator=g).to(dtype)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def via_file(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def params(model):
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


def same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].keys() == b[k].keys()
        for n, x in a[k].items():
            y = b[k][n]
            if isinstance(x, dict):
                assert x.keys() == y.keys(), (k, n)
                for f in x:
                    same = x[f] == y[f] if not torch.is_tensor(x[f]) else (
                        torch.equal(x[f], y[f]) and x[f].dtype == y[f].dtype)
                    assert same, (k, n, f)
            else:
                assert torch.equal(x, y) and x.dtype == y.dtype, (k, n)


# fused: one compile per precision (the slowest tests here: about 10-60 s each, cold)
RESUME = [*((p, False) for p in PRECISIONS), *((p, True) for p in PRECISIONS)]


@pytest.mark.parametrize("precision,fused", RESUME,
                         ids=[f"{p}-{'fused' if f else 'eager'}" for p, f in RESUME])
def test_resume_is_bit_exact(precision, fused):
    model, opt = trained(precision, fused, dtype=torch.float64, min_quantized_size=0)
    sd = via_file(opt.state_dict())
    twin = copy.deepcopy(model)
    resumed = of.AdamW(twin.parameters(), lr=1e-2, fused=fused).configure(state_precision=precision,
                                                                         min_quantized_size=0)
    resumed.load_state_dict(sd)
    same_state(resumed.state_dict()["state"], opt.state_dict()["state"])
    train(model, opt, 3, seed=5)
    train(twin, resumed, 3, seed=5)
    assert torch.equal(params(model), params(twin))
    same_state(resumed.state_dict()["state"], opt.state_dict()["state"])


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_fused_pieces_larger_than_the_eager_chunks(precision, monkeypatch):
    """A tensor of several eager chunks: without stochastic rounding (int8) one compiled call
    takes several of them, with the same result as a call per chunk, bit for bit; with it
    (int4) the calls keep the eager chunks, whose positions place the noise."""
    lowbit_step = importlib.import_module("optforge.lowbit.step")   # (the package's step() hides it)
    calls = []
    run_piece = lowbit_step._run_piece
    monkeypatch.setattr(lowbit_step, "_run_piece", lambda *a: calls.append(a[6] - a[5]) or run_piece(*a))
    results = []
    for fused_chunk in (CHUNK, 2 * CHUNK):
        monkeypatch.setattr(lowbit_step, "FUSED_CHUNK", fused_chunk)
        calls.clear()
        w = nn.Parameter(torch.randn(3 * CHUNK + 1000, generator=torch.Generator().manual_seed(0)))
        opt = of.AdamW([w], lr=1e-2, fused=True).configure(state_precision=precision)
        for k in range(3):
            w.grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(k))
            opt.step()
        low = [st for st in opt.state[w].values() if isinstance(st, LowBitState)]
        results.append([w.detach().clone()] + [x for st in low for x in (st.codes, st.scales)])
    assert max(calls) == (2 * CHUNK if precision == "int8" else CHUNK)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_eager_chunks_bound_the_temporaries_and_do_not_change_the_result(monkeypatch):
    """A tensor of several eager chunks and small tensors grouped into one: the buffers hold
    a chunk (less than twice its size: a chunk ends with the tensor that fills it), not the
    whole state, and any chunk size gives the same step bit for bit."""
    lowbit_step = importlib.import_module("optforge.lowbit.step")
    sizes = []
    take = ChunkBuffers.take
    monkeypatch.setattr(ChunkBuffers, "take", lambda self, *a: sizes.append(a[1]) or take(self, *a))
    results = []
    for chunk in (4096, 1 << 20):
        monkeypatch.setattr(lowbit_step, "EAGER_CHUNK", chunk)
        g = torch.Generator().manual_seed(0)
        ws = [nn.Parameter(torch.randn(n, generator=g)) for n in (10 * 4096 + 300, 700, 900, 3000)]
        opt = of.AdamW(ws, lr=1e-2).configure(state_precision="int8", min_quantized_size=0)
        sizes.clear()
        for k in range(3):
            for w in ws:
                w.grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(k))
            opt.step()
        assert sizes and max(sizes) < 2 * chunk
        low = [st for w in ws for st in opt.state[w].values() if isinstance(st, LowBitState)]
        results.append([w.detach().clone() for w in ws] + [x for st in low for x in (st.codes, st.scales)])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_tensors_grouped_in_one_eager_chunk_step_as_apart(precision, monkeypatch):
    """Two tensors in one eager chunk (their states decoded into one buffer each) step as
    they do in a chunk each; with bf16 parameters, whose bf16 state decodes to itself."""
    lowbit_step = importlib.import_module("optforge.lowbit.step")
    results = []
    for chunk in (CHUNK, 3000):                             # one chunk, a chunk per tensor
        monkeypatch.setattr(lowbit_step, "CHUNK", chunk)
        monkeypatch.setattr(lowbit_step, "EAGER_CHUNK", chunk)
        g = torch.Generator().manual_seed(0)
        ws = [nn.Parameter(torch.randn(n, generator=g).bfloat16()) for n in (3000, 2000)]
        opt = of.AdamW(ws, lr=1e-2, fused=False).configure(state_precision=precision, min_quantized_size=0)
        for k in range(3):
            for w in ws:
                w.grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(k)).bfloat16()
            opt.step()
        results.append([w.detach().clone() for w in ws]
                       + [x.codes for w in ws for x in opt.state[w].values() if isinstance(x, LowBitState)])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("copy_of", [copy.deepcopy, lambda x: pickle.loads(pickle.dumps(x))],
                         ids=["deepcopy", "pickle"])
def test_a_copy_mid_run_continues_identically(copy_of):
    model, opt = trained("int4", min_quantized_size=0)
    twin_model, twin = copy_of((model, opt))
    assert all(x.code is CODES["int4"][kind] for x, kind in
               ((twin.state[twin_model[0].weight]["exp_avg"], "signed"),
                (twin.state[twin_model[0].weight]["exp_avg_sq"], "non_negative")))
    train(model, opt, 3, seed=4)
    train(twin_model, twin, 3, seed=4)
    assert torch.equal(params(model), params(twin_model))


def test_checkpoint_holds_codes_and_scales_only():
    _, opt = trained("int4")
    entry = opt.state_dict()["state"][0]["exp_avg"]
    assert entry["code"] == "int4-signed-sr" and entry["shape"] == [96, 80]
    assert entry["codes"].dtype == torch.uint8 and entry["codes"].numel() == 96 * 80 // 2
    assert entry["scales"].numel() == 96 * 80 // 64 and entry["scales"].dtype == torch.bfloat16


@pytest.mark.parametrize("precision", PRECISIONS)
def test_full_precision_checkpoint_loads_into_low_bit_and_back(precision):
    model, full = trained(None)
    model_low, low = copy.deepcopy(model), None
    low = of.AdamW(model_low.parameters(), lr=1e-2).configure(state_precision=precision)
    low.load_state_dict(via_file(full.state_dict()))        # encoded on load
    converted = copy.deepcopy(full).configure(state_precision=precision)
    same_state(low.state_dict()["state"], converted.state_dict()["state"])
    back = of.AdamW(copy.deepcopy(model).parameters(), lr=1e-2)
    back.load_state_dict(via_file(low.state_dict()))        # decoded on load
    for k, st in back.state_dict()["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            x, ref = st[name], full.state_dict()["state"][k][name]
            assert x.dtype == torch.float32 and x.shape == ref.shape
            assert (x - ref).abs().max() <= 0.2 * ref.abs().max()


def test_a_checkpoint_of_another_precision_is_recoded():
    model, int8 = trained("int8")
    opt = of.AdamW(copy.deepcopy(model).parameters(), lr=1e-2).configure(state_precision="fp8")
    opt.load_state_dict(via_file(int8.state_dict()))
    assert opt.state_dict()["state"][0]["exp_avg"]["code"] == "fp8-signed"
    expected = copy.deepcopy(int8).configure(state_precision="fp8")
    same_state(opt.state_dict()["state"], expected.state_dict()["state"])


def test_bf16_parameters_with_fp32_state_and_low_bit_state():
    model, opt = trained("int8", dtype=torch.bfloat16, fp32_state=True, min_quantized_size=0)
    assert isinstance(opt.state[model[0].weight]["exp_avg"], LowBitState)
    sd = via_file(opt.state_dict())
    twin = copy.deepcopy(model)
    resumed = of.AdamW(twin.parameters(), lr=1e-2).configure(state_precision="int8", fp32_state=True,
                                                            min_quantized_size=0)
    resumed.load_state_dict(sd)
    train(model, opt, 2, seed=3)
    train(twin, resumed, 2, seed=3)
    assert torch.equal(params(model), params(twin))
    opt.configure(state_precision=None)
    assert opt.state[model[0].weight]["exp_avg"].dtype == torch.float32   # fp32_state: decoded to float32


def test_a_broken_low_bit_entry_is_refused_before_anything_loads():
    model, opt = trained("int8")
    before = via_file(opt.state_dict())
    for corrupt, message in [
        (lambda e: e.update(shape=[3, 3]), r"has shape \(3, 3\), expected \(96, 80\)"),
        (lambda e: e.update(code="int7"), r"code 'int7', which this version of optforge does not know"),
        (lambda e: e.update(codes=e["codes"][:-1]),
         r"in code 'int8-signed' needs codes of torch.int8 and length 7680, got torch.int8 of shape "
         r"\(7679,\)"),
    ]:
        sd = via_file(opt.state_dict())
        corrupt(sd["state"][0]["exp_avg"])
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict(sd)
        same_state(opt.state_dict()["state"], before["state"])


def test_complex_parameters_keep_low_bit_state_as_real_pairs():
    z = nn.Parameter(torch.randn(64, 64, dtype=torch.complex64))
    ref = nn.Parameter(z.detach().clone())
    opt = of.Adam([z], lr=1e-2).configure(state_precision="bf16")
    full = of.Adam([ref], lr=1e-2)
    for _ in range(3):
        for p, o in ((z, opt), (ref, full)):
            o.zero_grad()
            (p.abs() ** 2).sum().backward()
            o.step()
    assert opt.state[z]["exp_avg"].shape == (64, 64, 2)
    assert (z - ref).abs().max() < 1e-3
    opt.configure(state_precision=None)
    assert opt.state[z]["exp_avg"].dtype == torch.complex64


# ---- options and errors ---------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["int16", "INT8", 8, True, ""])
def test_bad_precision_is_refused_by_name(bad):
    with pytest.raises(ValueError, match=rf"invalid state_precision={bad!r}: expected one of None, 'bf16'"):
        of.AdamW([nn.Parameter(torch.zeros(3))]).configure(state_precision=bad)
    with pytest.raises(ValueError, match="invalid state_precision"):
        of.AdamW([{"params": [nn.Parameter(torch.zeros(3))], "state_precision": bad}])
    with pytest.raises(ValueError, match="invalid state_precision"):
        of.create_optimizer(nn.Linear(2, 2), "adamw", state_precision=bad)


@pytest.mark.parametrize("bad", [-1, 1.5, "4096", True])
def test_bad_threshold_is_refused_by_name(bad):
    opt = of.AdamW([nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="invalid min_quantized_size"):
        opt.configure(min_quantized_size=bad)
    assert opt.param_groups[0]["min_quantized_size"] == 4096


@pytest.mark.parametrize("name", ["lamb", "adafactor", "muon", "normuon", "soap", "shampoo", "prodigy",
                                  "came", "mars", "adam_mini"])
def test_optimizers_that_are_not_elementwise_refuse(name):
    info = of.get_optimizer_info(name)
    message = rf"state_precision='int8'.*{info.cls.__name__}'s update is not elementwise"
    with pytest.raises(ValueError, match=message):
        of.create_optimizer(nn.Linear(4, 4), name, state_precision="int8")


def test_an_unknown_state_kind_is_refused():
    class Odd(of.MomentumSGD):
        state_kinds = dict(velocity="positive")

    with pytest.raises(ValueError, match=r"Odd.state_kinds\['velocity'\] is 'positive'"):
        Odd([nn.Parameter(torch.zeros(3))]).configure(state_precision="int8")


def test_configure_keeps_and_turns_off():
    model, opt = trained("int8")
    opt.configure(skip_nonfinite=True)                      # ... leaves state_precision as it is
    assert opt.param_groups[0]["state_precision"] == "int8"
    opt.configure(state_precision=None)
    assert all(torch.is_tensor(x) for st in opt.state.values() for x in st.values())
    train(model, opt, 1)


def test_create_optimizer_and_optimizer_args_accept_it():
    args = of.parse_optimizer_args(["state_precision=int4", "min_quantized_size=0", "betas=0.9,0.99"])
    opt = of.create_optimizer(nn.Linear(3, 3), "lion", **args)
    assert opt.param_groups[0]["state_precision"] == "int4" and opt.param_groups[0]["min_quantized_size"] == 0


def test_compare_accepts_it():
    from optforge.compare.options import parse_optimizer_args

    args = parse_optimizer_args(["state_precision=int8", "lion:min_quantized_size=0"], ["adamw", "lion"])
    assert args == {"adamw": {"state_precision": "int8"},
                    "lion": {"state_precision": "int8", "min_quantized_size": 0}}
    with pytest.raises(ValueError, match="has no argument 'state_precison'"):
        parse_optimizer_args(["state_precison=int8"], ["adamw"])


def test_a_users_own_optimizer_gets_low_bit_state():
    from optforge.constraints import unit_interval

    class SignMomentum(of.Optimizer):
        constraints = dict(beta=unit_interval)
        state_names = ("momentum",)
        state_kinds = dict(momentum="sign")

        def __init__(self, params, lr=1e-2, beta=0.9, weight_decay=0.0, *, weight_decay_mode="coupled",
                     maximize=False, fused=False):
            super().__init__(params, dict(lr=lr, beta=beta, weight_decay=weight_decay, maximize=maximize,
                                          weight_decay_mode=weight_decay_mode, fused=fused))

        def scalars(self, group, t):
            return dict(step=-group["lr"])

        @staticmethod
        def kernel(group, p, g, s, c):
            m = s["momentum"].lerp_(g, 1 - group["beta"])
            p.add_(m.sign(), alpha=c["step"])

    w = nn.Parameter(torch.randn(100, 100))
    opt = SignMomentum([w]).configure(state_precision="int4")
    w.square().sum().backward()
    opt.step()
    assert isinstance(opt.state[w]["momentum"], LowBitState)


# ---- the references ------------------------------------------------------------------------


def test_int8_adamw_stays_as_close_to_float32_as_bitsandbytes_and_torchao():
    """200 minibatch steps of AdamW on a regression task (as benchmarks/state_precision.py
    fidelity, smaller): the distance to float32 AdamW, relative to the distance it moved."""
    bnb = pytest.importorskip("bitsandbytes")
    torchao_optim = pytest.importorskip("torchao.optim")
    torch.manual_seed(123)
    teacher = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 16))

    def distance(build):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 16))
        start = params(model)
        opt = build(model.parameters())
        g = torch.Generator().manual_seed(0)
        for _ in range(200):
            x = torch.randn(32, 64, generator=g)
            opt.zero_grad()
            (model(x) - teacher(x).detach()).square().mean().backward()
            opt.step()
        return params(model), start

    kw = dict(lr=1e-3, weight_decay=0.01)
    ref, start = distance(lambda ps: torch.optim.AdamW(ps, **kw))

    def rel(build):
        return ((distance(build)[0] - ref).norm() / (ref - start).norm()).item()

    ours = rel(lambda ps: of.AdamW(ps, **kw).configure(state_precision="int8"))
    assert 0 < ours <= rel(lambda ps: bnb.optim.AdamW8bit(ps, **kw))
    assert ours <= rel(lambda ps: torchao_optim.AdamW8bit(ps, **kw))
