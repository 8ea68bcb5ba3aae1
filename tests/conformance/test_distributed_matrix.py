"""Whole-matrix optimizers (Muon, NorMuon, SOAP, Shampoo, PSGD Kron, GaLore) under FSDP2 by owner compute
(optforge.distributed_matrix), gloo, CPU, 4 and 2 ranks (one process group per world size, in
ranks spawned once):

- the parameters equal one process stepping on the same gradients (uneven shards, empty
  shards, same-shape matrices stacked on their owner, many rounds in flight), and for Muon,
  NorMuon, Shampoo, PSGD Kron and GaLore one process training on the full batch;
- the state is not duplicated: the ranks' state adds up to one process's (Muon's momentum
  sharded like the params, SOAP's, Shampoo's, Kron's and GaLore's whole-matrix state on each
  matrix's owner);
- FSDP2 x tensor parallel (2 x 2 mesh, column- and row-parallel layers): Muon and SOAP;
- HSDP (replicated and sharded mesh dims) and a DCP checkpoint saved on 4 ranks resumed on 2
  (Muon, SOAP, Shampoo, PSGD Kron, GaLore);
- a layout no whole matrix can be assembled from is refused before anything changes."""

import re
import socket
import time

import pytest
import torch
import torch.distributed as dist
from distributed_matrix_worker import (
    CASES,
    FULL_BATCH,
    RESUMED,
    make_model,
    make_optimizer,
    reference,
    replay,
    run_rank,
    state_numel,
)

from optforge.distributed_matrix import matrix_cost, owner_of

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("matrix") / "results.pt"
    start = time.perf_counter()
    mp.spawn(run_rank, args=((free_port(), free_port()), str(out)), nprocs=4, join=True)
    print(f"4 then 2 ranks: {time.perf_counter() - start:.1f} s")
    return torch.load(out, weights_only=False)


@pytest.fixture(params=[2, 4], ids=["2_ranks", "4_ranks"])
def world(request, spawned):
    return request.param, spawned[request.param]


def ok(value):
    assert not isinstance(value, str), value      # a rank's traceback
    return value


@pytest.mark.parametrize("case", CASES)
def test_fsdp2_equals_one_process_on_the_same_gradients(world, case):
    """The optimizer alone: one process stepping on the whole gradients FSDP2 produced."""
    got = ok(world[1][("fsdp", case)])
    expected = replay(case, got["grads"])
    assert (expected - reference(case, steps=0)).abs().max() > 1e-3     # it trained
    torch.testing.assert_close(got["params"], expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", FULL_BATCH)
def test_fsdp2_equals_one_process_on_the_full_batch(world, case):
    """Muon, Shampoo, PSGD Kron and GaLore end to end (Shampoo's epsilon keeps its inverse roots
    from amplifying rounding noise). (SOAP is not compared so: on rectangular matrices its larger factor is
    rank-deficient, so part of each eigenbasis is set by rounding, and FSDP2's gradients, summed
    over ranks, round differently from one process's; Adam's per-coordinate scaling in that
    basis then moves the trajectory by O(1e-2) within a few steps, in one process alike.)"""
    got = ok(world[1][("fsdp", case)])
    torch.testing.assert_close(got["params"], reference(case), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_state_is_not_duplicated(world, case):
    size, results = world
    got = ok(results[("fsdp", case)])
    model = make_model()
    opt = make_optimizer(case, model.parameters())
    opt.zero_grad()
    model(torch.ones(1, 6, dtype=torch.float64)).sum().backward()
    opt.step()
    one_process = state_numel(opt)
    assert sum(got["state_per_rank"]) == one_process, got["state_per_rank"]
    assert max(got["state_per_rank"]) < one_process
    assert got["muon_state_sharded"]


@pytest.mark.parametrize("case", ["muon", "soap"])
def test_hsdp_equals_one_process_on_the_same_gradients(world, case):
    """HSDP (a 2-D mesh: replicated over one dim, sharded over the other): each box has two
    holders; one sends it, both get its result."""
    got = ok(world[1][("hsdp", case)])
    expected = replay(case, got["grads"])
    torch.testing.assert_close(got["params"], expected, rtol=1e-9, atol=1e-12)
    if case == "muon":
        torch.testing.assert_close(got["params"], reference(case), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", RESUMED)
def test_checkpoint_saved_on_4_ranks_resumes_on_2(spawned, case):
    """torch.distributed.checkpoint: Muon's momentum is sharded like the params; SOAP's whole
    state is saved by each matrix's owner (plain tensors of the whole shape, one writer each)
    and read back by whichever rank owns the matrix in the new world."""
    saved, resumed = ok(spawned[4][("dcp", case)]), ok(spawned[2][("dcp", case)])
    expected = replay(case, saved["grads"] + resumed["grads"])
    torch.testing.assert_close(resumed["params"], expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", ["muon", "soap"])
def test_fsdp2_with_tensor_parallel_equals_one_process(spawned, case):
    """Column- and row-parallel layers under FSDP2 on a 2 x 2 mesh: the matrices are sharded
    over both mesh dims (FSDP2's _StridedShard over TP's Shard(0); Shard(0) and Shard(1))."""
    got = ok(spawned[4][("tp", case)])
    assert "Shard(dim=1)" in str(got["placements"]) and "_StridedShard" in str(got["placements"])
    torch.testing.assert_close(got["params"], replay(case, got["grads"], tp=True), rtol=1e-9, atol=1e-12)
    if case == "muon":
        torch.testing.assert_close(got["params"], reference(case, tp=True), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["muon", "soap"])
def test_partial_placements_are_refused_before_any_change(world, name):
    got = ok(world[1][("refuse", name)])
    pattern = rf"{name}: a DTensor with unreduced \(Partial\) placements .* on DeviceMesh"
    assert got["error"] and re.search(pattern, got["error"], re.IGNORECASE), got["error"]
    assert got["unchanged"]


def test_bf16_params_through_float32_copies_are_refused_before_any_change(world):
    got = ok(world[1][("refuse", "low_precision")])
    assert got["error"] and "Muon does not support fp32_state or stochastic_rounding with bf16/fp16 DTensor" \
        in got["error"], got["error"]
    assert got["unchanged"]


def test_stacked_orthogonalize_equals_one_at_a_time():
    from optforge.optimizers.muon import orthogonalize

    for shape in [(3, 8, 5), (2, 5, 8), (4, 6, 6)]:
        x = torch.randn(shape, dtype=torch.float64)
        one_by_one = torch.stack([orthogonalize(m, dtype=None) for m in x])
        torch.testing.assert_close(orthogonalize(x, dtype=None), one_by_one, rtol=1e-12, atol=1e-14)
        assert not torch.allclose(orthogonalize(x, dtype=None), x / x[0].norm())    # it did something


class FakeMesh:
    def __init__(self, n):
        self.n = n

    def size(self):
        return self.n


class Holder:
    pass


def test_owners_balance_cost_and_stay_put():
    opt, mesh = Holder(), FakeMesh(4)
    same = [torch.empty(64, 64) for _ in range(8)]
    assert owner_of(opt, mesh, same) == [0, 1, 2, 3, 0, 1, 2, 3]          # round-robin
    big, small = torch.empty(256, 256), [torch.empty(16, 16) for _ in range(3)]
    owners = owner_of(opt, mesh, [*small, big])
    assert owners[3] == 0 and owners[:3] == [1, 2, 3]                    # longest first
    assert owner_of(opt, mesh, [big, *same]) == [0, 0, 1, 2, 3, 0, 1, 2, 3]   # kept
    assert matrix_cost((256, 8, 3, 3)) == 256 * 72 * 72 and matrix_cost((7,)) == 7
