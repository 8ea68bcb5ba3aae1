"""optforge.scratch: large temporaries of eager steps reuse buffers, never one still referenced,
with results equal bit for bit to plain foreach. MIN_BYTES is lowered so small tensors pool."""

import pytest
import torch

import optforge.scratch as scratch
from helpers import NOT_GENERIC, OPTIMIZER_KWARGS, make_model, trajectory, two_groups
from optforge.registry import list_optimizers
from optforge.tensorlist import TensorList


class Owner:   # anything with a __dict__ can own a pool; optimizers do in step()
    pass


@pytest.fixture
def pool_all(monkeypatch):
    monkeypatch.setattr(scratch, "MIN_BYTES", 1)


def _same_memory(a, b):
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_no_pool_outside_a_step(pool_all):
    assert scratch.active() is None
    x = TensorList([torch.ones(4)])
    y = x.add(1)
    assert scratch.held_bytes(x) == 0 and torch.equal(y[0], torch.full((4,), 2.0))


def test_a_buffer_in_use_is_never_taken(pool_all):
    like = torch.zeros(8)
    pool = scratch.ScratchPool()
    a = pool.take(like)
    b = pool.take(like)
    assert not _same_memory(a, b)                   # a is alive: b gets other memory
    view = a[2:]
    del a
    c = pool.take(like)
    assert not _same_memory(c, view)                # a view keeps its buffer busy
    del view
    d = pool.take(like)
    assert d.data_ptr() in {buf.tensor.data_ptr() for bufs in pool._buffers.values() for buf in bufs}
    assert len(pool._buffers[(like.shape, like.dtype, like.device)]) == 3   # reused, not a 4th


def test_live_temporaries_keep_their_values(pool_all):
    owner, x = Owner(), TensorList([torch.arange(6.0)])
    with scratch.using(owner):
        a = x.add(1)
        b = x.mul(10)                                # must not land in a's buffer
        c = b.sqrt()
        assert not _same_memory(a[0], b[0]) and not _same_memory(b[0], c[0])
        del b
        d = x.neg()                                  # b's buffer is free: reused
    assert torch.equal(a[0], torch.arange(6.0) + 1)
    assert torch.equal(c[0], (torch.arange(6.0) * 10).sqrt())
    assert torch.equal(d[0], -torch.arange(6.0))


def test_an_escaped_temporary_is_never_overwritten(pool_all):
    owner, x = Owner(), TensorList([torch.arange(6.0)])
    with scratch.using(owner):
        kept = x.clone()                             # e.g. stored in the optimizer's state
    assert scratch.held_bytes(owner) == 0            # the pool let go of it
    for _ in range(2):
        with scratch.using(owner):
            x.mul(-1), x.add(5)
    assert torch.equal(kept[0], torch.arange(6.0))


def test_held_memory_is_the_last_steps_peak_and_releasable(pool_all):
    owner = Owner()
    x = TensorList([torch.zeros(100), torch.zeros(50)])     # float32: 400 + 200 bytes
    with scratch.using(owner):
        a, b = x.add(1), x.add(2)                            # two alive at once
        del a, b
        x.add(3)                                             # reuses one
    assert scratch.held_bytes(owner) == 2 * 600
    with scratch.using(owner):
        TensorList(x[:1]).add(1)                             # this step needs one (100,) buffer
    assert scratch.held_bytes(owner) == 400
    scratch.release(owner)
    assert scratch.held_bytes(owner) == 0


def test_an_optimizer_keeps_at_most_one_buffer_per_parameter_of_a_shape(pool_all):
    """Three (100,) and two (50,) temporaries alive at once; the owner has two (100,)
    parameters and none of (50,): two (100,) buffers and one (50,) buffer are kept."""
    owner = Owner()
    owner.param_groups = [{"params": [torch.zeros(100), torch.zeros(7)]}, {"params": [torch.zeros(100)]}]
    x = TensorList([torch.zeros(100), torch.zeros(50)])
    with scratch.using(owner):
        a, b, c = x.add(1), x.add(2), TensorList(x[:1]).add(3)
        del a, b, c
    assert scratch.held_bytes(owner) == 2 * 400 + 200
    with scratch.using(owner):                              # the kept ones are taken again
        a, b = x.add(1), x.add(2)
        assert scratch.active().nbytes() == 2 * 600
        del a, b
    assert scratch.held_bytes(owner) == 2 * 400 + 200


def test_only_contiguous_plain_cpu_tensors_of_min_bytes(monkeypatch):
    monkeypatch.setattr(scratch, "MIN_BYTES", 64)
    big, small = torch.zeros(16), torch.zeros(15)            # 64 and 60 bytes
    strided = torch.zeros(32)[::2]

    class Sub(torch.Tensor):
        pass

    sub = torch.zeros(16).as_subclass(Sub)
    assert scratch.ScratchPool.pooled([small, big, strided, sub]) == [1]
    monkeypatch.setattr(scratch, "MIN_BYTES", None)
    assert scratch.ScratchPool.pooled([big]) == []
    owner = Owner()
    with scratch.using(owner):
        TensorList([big]).add(1)
    assert scratch.held_bytes(owner) == 0


def _operands():
    x = [torch.randn(5, 3, dtype=torch.float64), torch.randn(7, dtype=torch.float64)]
    y = [torch.randn(5, 3, dtype=torch.float64), torch.randn(7, dtype=torch.float64)]
    zero_d = [torch.tensor(2.5, dtype=torch.float64), torch.tensor(-0.5, dtype=torch.float64)]
    return TensorList(x), y, zero_d


@pytest.mark.parametrize("op", [
    lambda x, y, z: x.clone(), lambda x, y, z: x.neg(), lambda x, y, z: TensorList(t.abs() for t in x).sqrt(),
    lambda x, y, z: x.abs(), lambda x, y, z: x.sign(),
    lambda x, y, z: x.add(y, alpha=0.3), lambda x, y, z: x.add(2.0), lambda x, y, z: x.add([1.0, -2.0]),
    lambda x, y, z: x.sub(y, alpha=-1.5), lambda x, y, z: x.sub(0.25), lambda x, y, z: x.sub([0.5, 3.0]),
    lambda x, y, z: x.mul(y), lambda x, y, z: x.mul(0.1), lambda x, y, z: x.mul([3.0, 0.7]),
    lambda x, y, z: x.mul(z), lambda x, y, z: x.div(y), lambda x, y, z: x.div(3.0),
    lambda x, y, z: x.div([2.0, 9.0]), lambda x, y, z: x.div(z),
], ids=lambda op: "")
def test_pooled_ops_equal_foreach(monkeypatch, op):
    x, y, z = _operands()
    expected = op(x, y, z)
    monkeypatch.setattr(scratch, "MIN_BYTES", 100)          # the (5, 3) tensor pools, the (7,) not
    with scratch.using(Owner()):
        got = op(x, y, z)
        assert scratch.active().nbytes() == 120
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_a_promoting_operand_is_not_cast_into_a_buffer(pool_all):
    x = TensorList([torch.ones(4, dtype=torch.float32)])
    y = [torch.full((4,), 1e-10, dtype=torch.float64)]
    with scratch.using(Owner()):
        got = x.add(y)
    assert got[0].dtype == torch.float64 and torch.equal(got[0], x[0] + y[0])


def test_a_broadcasting_operand_is_not_written_into_a_buffer(pool_all):
    x = TensorList([torch.ones(4)])
    y = [torch.ones(3, 4)]
    with scratch.using(Owner()):
        got = x.mul(y)
        assert scratch.active().nbytes() == 0
    assert got[0].shape == (3, 4)


def _eager_trajectory(info, monkeypatch, min_bytes):
    monkeypatch.setattr(scratch, "MIN_BYTES", min_bytes)
    model = make_model()
    kw = dict(OPTIMIZER_KWARGS.get(info.name, {"lr": 1e-2}))
    lr = kw.pop("lr", 1e-2)
    opt = info.cls(two_groups(model, lr=lr, weight_decay=0.1), **kw)
    traj = trajectory(model, opt, steps=12)
    return traj, scratch.held_bytes(opt)


@pytest.mark.parametrize("info", [i for i in list_optimizers(with_info=True) if i.name not in NOT_GENERIC],
                         ids=lambda i: i.name)
def test_every_optimizer_steps_alike_with_the_pool(info, monkeypatch):
    plain, held = _eager_trajectory(info, monkeypatch, None)
    assert held == 0
    pooled, _ = _eager_trajectory(info, monkeypatch, 200)    # the 4-D and 2-D weights pool
    for step, (a, b) in enumerate(zip(plain, pooled), start=1):
        assert torch.equal(a, b), f"step {step}"


def test_maximize_and_coupled_decay_temporaries_pool(monkeypatch):
    import optforge as of
    monkeypatch.setattr(scratch, "MIN_BYTES", 1)
    p = torch.nn.Parameter(torch.randn(10))
    p.grad = torch.randn(10)
    opt = of.AdaBelief([p], weight_decay=0.1, weight_decay_mode="coupled", maximize=True)
    opt.step()
    assert scratch.held_bytes(opt) > 0


def test_the_fused_path_does_not_use_the_pool(monkeypatch):
    import optforge as of
    monkeypatch.setattr(scratch, "MIN_BYTES", 1)
    p = torch.nn.Parameter(torch.randn(10))
    p.grad = torch.randn(10)
    opt = of.Lion([p], fused=True)
    opt.step()
    opt.step()
    assert scratch.held_bytes(opt) == 0


@pytest.mark.parametrize("n", [7, 2**18], ids=["foreach", "one-by-one"])
def test_rdiv_divides_in_place_like_div(n, pool_all):
    torch.manual_seed(0)
    num, den = [torch.randn(n), torch.randn(3)], [torch.rand(n) + 0.5, torch.rand(3) + 0.5]
    expected = [a / b for a, b in zip(num, den)]
    d = TensorList(x.clone() for x in den)
    ptrs = [x.data_ptr() for x in d]
    owner = Owner()
    with scratch.using(owner):
        got = d.rdiv_(num)
    assert got is d and [x.data_ptr() for x in d] == ptrs       # the quotient in the denominator's memory
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert scratch.held_bytes(owner) == 0


@pytest.mark.parametrize("kwargs", [{}, {"betas": (0.0, 0.999), "weight_decay": 0.1},
                                    {"weight_decay_mode": "absolute", "weight_decay": 0.1},
                                    {"maximize": True},
                                    {"weight_decay_mode": "coupled", "weight_decay": 0.1}],
                         ids=["defaults", "beta1-0-decoupled", "absolute", "maximize", "coupled"])
def test_prodigy_holds_one_parameter_sized_buffer(kwargs, monkeypatch):
    """Its whole-tensor D sums need x_0 - x, then |s|, then the update sqrt(v): one buffer
    serves all three (4 bytes per float32 entry held between steps, not one per temporary).
    With maximize or coupled decay its gradient is one more, alive at the same time: the pool
    keeps one of the two."""
    import optforge as of
    monkeypatch.setattr(scratch, "MIN_BYTES", 2**20)        # 1 MiB: the 2**18-entry tensor pools
    p = torch.nn.Parameter(torch.randn(2**18))
    p.grad = torch.randn(2**18)           # the same each step: x_0 - x follows it, D grows
    opt = of.Prodigy([p], **kwargs)
    for _ in range(3):
        opt.step()
    assert opt.param_groups[0]["d"] > opt.param_groups[0]["d0"]    # the D update ran
    assert scratch.held_bytes(opt) == 4 * p.numel()


@pytest.mark.parametrize("info", [i for i in list_optimizers(with_info=True) if i.name not in NOT_GENERIC],
                         ids=lambda i: i.name)
def test_no_optimizer_holds_more_than_one_buffer_per_parameter(info, monkeypatch):
    """With maximize and coupled weight decay where it has them (one more parameter-sized
    gradient), run whole and in chunks: at most 4 bytes per float32 entry held between steps."""
    import optforge.eager_chunks as eager_chunks
    monkeypatch.setattr(scratch, "MIN_BYTES", 2**20)        # 1 MiB: the (512, 512) matrix pools
    options = info.cls.__init__.__code__.co_varnames
    kw = dict(OPTIMIZER_KWARGS.get(info.name, {"lr": 1e-2}))
    if "maximize" in options:
        kw["maximize"] = True
    if "weight_decay_mode" in options:
        kw.update(weight_decay_mode="coupled", weight_decay=0.1)
    for size in (None, 2**14):
        monkeypatch.setattr(eager_chunks, "CHUNK", size)
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(512, 512))
        opt = info.cls([p], **kw)
        for _ in range(2):
            p.grad = torch.randn(512, 512)
            opt.step()
        assert scratch.held_bytes(opt) <= 4 * p.numel()
