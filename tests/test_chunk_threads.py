"""optforge.chunk_threads: pieces run on worker threads with torch ops single-threaded; every
piece runs once; errors, torch's thread count and grad mode come back to the caller."""

import threading
import time

import pytest
import torch

from optforge import chunk_threads


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_every_piece_runs_once_on_worker_threads_with_one_torch_thread(two_threads):
    seen, lock = [], threading.Lock()

    def fn(piece):
        with lock:
            seen.append((piece, threading.current_thread().name, torch.get_num_threads()))

    chunk_threads.run(fn, list(range(9)))
    assert sorted(p for p, _, _ in seen) == list(range(9))
    assert {name.split("_")[0] for _, name, _ in seen} == {"optforge-chunks"}
    assert {n for _, _, n in seen} == {1}
    assert torch.get_num_threads() == 2


def test_one_thread_or_one_piece_runs_in_the_caller():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        names = []
        chunk_threads.run(lambda piece: names.append(threading.current_thread().name), [0, 1, 2])
        assert set(names) == {threading.current_thread().name}
    finally:
        torch.set_num_threads(before)


def test_an_error_is_raised_after_all_threads_stop_and_the_thread_count_is_restored(two_threads):
    done = []

    def fn(piece):
        if piece == 3:
            raise ValueError(f"bad piece {piece}")
        done.append(piece)

    with pytest.raises(ValueError, match="bad piece 3"):
        chunk_threads.run(fn, list(range(8)))
    snapshot = sorted(done)
    time.sleep(0.05)
    assert sorted(done) == snapshot                  # nothing still running
    assert {0, 2, 4, 6} <= set(done)                 # the other thread's share ran whole
    assert torch.get_num_threads() == 2


def test_grad_mode_follows_the_caller(two_threads):
    modes = []
    with torch.no_grad():
        chunk_threads.run(lambda piece: modes.append(torch.is_grad_enabled()), [0, 1, 2, 3])
    chunk_threads.run(lambda piece: modes.append(torch.is_grad_enabled()), [0, 1])
    assert modes == [False] * 4 + [True] * 2


def _on_one_then_two_workers(monkeypatch, train):
    """``train()``'s results with the chunks on one worker, then on two."""
    monkeypatch.setattr(chunk_threads, "STEP_THREADS", True)
    results = []
    for max_workers in (1, 2):
        monkeypatch.setattr(chunk_threads, "MAX_WORKERS", max_workers)
        torch.manual_seed(0)
        results.append(train())
    return results


def _steps(opt, params, n):
    for _ in range(n):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()


def test_a_threaded_chunked_step_equals_the_one_thread_step(two_threads, monkeypatch):
    import optforge
    from optforge import eager_chunks

    monkeypatch.setattr(eager_chunks, "CHUNK", 1000)

    def train():
        params = [torch.nn.Parameter(torch.randn(37, 301)), torch.nn.Parameter(torch.randn(2500))]
        _steps(optforge.Adan(params, lr=1e-2, weight_decay=0.1, fused=False), params, 4)
        return [p.detach().clone() for p in params]

    results = _on_one_then_two_workers(monkeypatch, train)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("precision", ["int8", "int4", "fp8"])
def test_a_threaded_low_bit_step_equals_the_one_thread_step(precision, two_threads, monkeypatch):
    import importlib

    import optforge

    lowbit_step = importlib.import_module("optforge.lowbit.step")
    monkeypatch.setattr(lowbit_step, "CHUNK", 4096)
    monkeypatch.setattr(lowbit_step, "EAGER_CHUNK", 4096)

    def train():
        params = [torch.nn.Parameter(torch.randn(9 * 4096 + 300)), torch.nn.Parameter(torch.randn(700))]
        opt = optforge.AdamW(params, lr=1e-2, fused=False).configure(state_precision=precision,
                                                                     min_quantized_size=0)
        _steps(opt, params, 3)
        codes = [x for p in params for st in opt.state[p].values() if hasattr(st, "codes")
                 for x in (st.codes, st.scales) if x is not None]
        return [p.detach().clone() for p in params] + codes

    results = _on_one_then_two_workers(monkeypatch, train)
    assert len(results[0]) > 2 and all(torch.equal(a, b) for a, b in zip(*results))
