"""optforge.eager_chunks: a large CPU bucket's eager step, run chunk by chunk, gives exactly the
whole-bucket step (every optimizer, odd chunk sizes that cut tensors mid-row and group others,
non-contiguous tensors, per-tensor steps, tensor lr, maximize, each weight decay mode), and
holds no parameter-sized scratch between steps."""

import pytest
import torch

import optforge as of
import optforge.eager_chunks as eager_chunks
import optforge.scratch as scratch
from helpers import NOT_GENERIC, make_model, optimizer_kwargs, trajectory, two_groups
from optforge.registry import list_optimizers

INFOS = [i for i in list_optimizers(with_info=True) if i.name not in NOT_GENERIC]


def _eager(info, params, **extra):
    kw = {**optimizer_kwargs(info.name), **extra}
    if "fused" in info.cls.__init__.__code__.co_varnames:
        kw["fused"] = False
    return info.cls(params, **kw)


@pytest.fixture
def count_chunked(monkeypatch):
    """The number of buckets stepped chunk by chunk."""
    calls = []
    step = eager_chunks.step
    monkeypatch.setattr(eager_chunks, "step", lambda opt, group, b: (calls.append(1), step(opt, group, b)))
    return calls


def _trajectory(info, monkeypatch, size):
    monkeypatch.setattr(eager_chunks, "CHUNK", size)
    model = make_model()
    lr = optimizer_kwargs(info.name)["lr"]
    return trajectory(model, _eager(info, two_groups(model, lr=lr, weight_decay=0.1)), steps=10)


@pytest.mark.parametrize("info", INFOS, ids=lambda i: i.name)
def test_every_optimizer_steps_alike_in_chunks(info, monkeypatch, count_chunked):
    whole = _trajectory(info, monkeypatch, None)
    assert not count_chunked
    chunked = _trajectory(info, monkeypatch, 7)   # 7: cuts the 54-entry conv weight mid-row
    assert bool(count_chunked) == eager_chunks.chunked_class(info.cls)
    for step, (a, b) in enumerate(zip(whole, chunked), start=1):
        assert torch.equal(a, b), f"step {step}"


CHUNKED = [i for i in INFOS if eager_chunks.chunked_class(i.cls)]


def test_the_elementwise_kernels_are_chunked():
    names = {i.name for i in CHUNKED}
    assert {"adam", "adamw", "adan", "ademamix", "adopt", "adabelief", "compass", "lion", "nadam",
            "schedule_free_adamw", "radam", "rprop"} <= names
    assert not names & {"lamb", "mars", "muon", "adafactor", "prodigy", "asgd"}


def _odd_params(dtype=torch.float64):
    """Contiguous, transposed (non-contiguous) and 0-d parameters."""
    g = torch.Generator().manual_seed(3)
    return [torch.nn.Parameter(torch.randn(9, 5, generator=g, dtype=dtype)),
            torch.nn.Parameter(torch.randn(6, 4, generator=g, dtype=dtype).t()),
            torch.nn.Parameter(torch.randn((), generator=g, dtype=dtype)),
            torch.nn.Parameter(torch.randn(23, generator=g, dtype=dtype))]


def _run_odd(info, monkeypatch, size, mode, lr):
    monkeypatch.setattr(eager_chunks, "CHUNK", size)
    params = _odd_params()
    opt = _eager(info, [{"params": params, "weight_decay": 0.05, "weight_decay_mode": mode,
                         "lr": lr}], maximize=True)
    g = torch.Generator().manual_seed(5)
    out = []
    for k in range(6):
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if i == 0:
                grad = torch.randn(5, 9, generator=g, dtype=p.dtype).t()   # a non-contiguous gradient
            p.grad = None if (i == 3 and k < 2) else grad       # steps differ within the bucket
        opt.step()
        out.append(torch.cat([p.detach().flatten() for p in params]))
    return out


@pytest.mark.parametrize("mode", ["coupled", "decoupled", "absolute"])
@pytest.mark.parametrize("info", CHUNKED, ids=lambda i: i.name)
def test_odd_layouts_steps_and_tensor_lr(info, mode, monkeypatch, count_chunked):
    lr = optimizer_kwargs(info.name)["lr"]
    whole = _run_odd(info, monkeypatch, None, mode, lr)
    chunked = _run_odd(info, monkeypatch, 4, mode, torch.tensor(lr, dtype=torch.float64))
    assert count_chunked
    for step, (a, b) in enumerate(zip(whole, chunked), start=1):
        assert torch.equal(a, b), f"step {step}"


def test_complex_parameters_step_alike(monkeypatch, count_chunked):
    out = []
    for size in (None, 5):
        monkeypatch.setattr(eager_chunks, "CHUNK", size)
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex128))
        opt = of.AdamW([p], lr=0.1, fused=False)
        for _ in range(3):
            p.grad = torch.randn(4, 3, dtype=torch.complex128)
            opt.step()
        out.append(p.detach().clone())
    assert count_chunked and torch.equal(*out)


def test_small_buckets_and_other_paths_run_whole(monkeypatch, count_chunked):
    monkeypatch.setattr(eager_chunks, "CHUNK", 16)
    small = torch.nn.Parameter(torch.randn(16))
    small.grad = torch.randn(16)
    of.Lion([small], fused=False).step()                 # 16 entries: one chunk, run whole
    big = torch.nn.Parameter(torch.randn(40, dtype=torch.bfloat16))
    big.grad = torch.randn(40, dtype=torch.bfloat16)
    of.Lion([big], fused=False).configure(fp32_state=True).step()   # float32 copies: whole
    assert not count_chunked
    big = torch.nn.Parameter(torch.randn(40))
    big.grad = torch.randn(40)
    of.Lion([big], fused=False).step()
    assert len(count_chunked) == 1


@pytest.mark.parametrize("info", [i for i in CHUNKED if i.name in
                                  {"adabelief", "adan", "ademamix", "adopt", "compass", "lion",
                                   "schedule_free_adamw", "adamw"}], ids=lambda i: i.name)
def test_no_parameter_sized_scratch_is_held(info, monkeypatch):
    """With chunks, temporaries are chunk-sized: none reaches the pool's size; without them the
    same step holds parameter-sized buffers (the control)."""
    monkeypatch.setattr(scratch, "MIN_BYTES", 2**20)        # 1 MiB: the 2**18-entry tensor pools
    held = {}
    for size in (None, 2**14):
        monkeypatch.setattr(eager_chunks, "CHUNK", size)
        p = torch.nn.Parameter(torch.randn(2**18))
        opt = _eager(info, [p])
        for _ in range(3):
            p.grad = torch.randn(2**18)
            opt.step()
        held[size] = scratch.held_bytes(opt)
    assert held[None] >= 2**20 and held[2**14] == 0
