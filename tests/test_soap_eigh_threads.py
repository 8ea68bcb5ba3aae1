import threading

import torch

from optforge.optimizers import soap


def _grams(*shapes):
    gen = torch.Generator().manual_seed(0)
    out = []
    for rows, cols in shapes:
        g = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
        out.append(g.T @ g)                       # rank-deficient where rows < cols
    return out


def test_first_eigenbases_run_one_thread_each_on_as_many_workers_as_threads(monkeypatch):
    seen, started = [], set()
    both_running = threading.Barrier(2, timeout=10)   # broken (an error) unless two eigh run at once
    eigh = torch.linalg.eigh

    def recording_eigh(m):
        me = threading.get_ident()
        seen.append((me, torch.get_num_threads(), len(m)))
        if me not in started:
            started.add(me)
            both_running.wait()
        return eigh(m)

    factors = _grams((4, 12), (3, 9), (5, 5), (2, 7))
    with torch.no_grad():
        expected = [soap._eigenbasis(f) for f in factors]
    monkeypatch.setattr(torch.linalg, "eigh", recording_eigh)
    bases = [torch.zeros_like(f) for f in factors]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        soap._set_eigenbases(list(zip(factors, bases)))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert sorted(n for _, _, n in seen) == [5, 7, 9, 12]
    assert {threads for _, threads, _ in seen} == {1}
    assert len(started) == 2
    by_worker = {}
    for worker, _, n in seen:
        by_worker.setdefault(worker, []).append(n)
    assert sorted(by_worker.values()) == [[9, 5], [12, 7]]    # largest first, in turn
    for b, q, f in zip(bases, expected, factors):
        assert torch.equal(b, q)
        vals = torch.diagonal(b.T @ f @ b)
        assert torch.all(vals[:-1] >= vals[1:] - 1e-12)      # by decreasing eigenvalue
        torch.testing.assert_close(b.T @ b, torch.eye(len(b), dtype=torch.float64))


def test_factors_too_wide_for_one_thread_keep_every_thread(monkeypatch):
    seen = []
    eigh = torch.linalg.eigh

    def recording_eigh(m):
        seen.append((len(m), torch.get_num_threads()))
        return eigh(m)

    monkeypatch.setattr(soap, "SINGLE_THREAD_EIGH_MAX_DIM", 8)
    monkeypatch.setattr(torch.linalg, "eigh", recording_eigh)
    factors = _grams((4, 12), (3, 5))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        soap._set_eigenbases([(f, torch.zeros_like(f)) for f in factors])
    finally:
        torch.set_num_threads(before)
    assert sorted(seen) == [(5, 1), (12, 2)]
