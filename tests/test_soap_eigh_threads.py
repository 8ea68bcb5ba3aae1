import torch

from optforge.optimizers import soap


def test_eigenbasis_runs_on_one_thread_and_restores_the_count(monkeypatch):
    seen = []
    eigh = torch.linalg.eigh

    def recording_eigh(m):
        seen.append(torch.get_num_threads())
        return eigh(m)

    monkeypatch.setattr(torch.linalg, "eigh", recording_eigh)
    g = torch.randn(4, 12, dtype=torch.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        q = soap._eigenbasis(g.T @ g)               # rank-deficient: 12 x 12 of rank 4
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen == [1]
    vals = torch.diagonal(q.T @ (g.T @ g) @ q)
    assert torch.all(vals[:-1] >= vals[1:] - 1e-12)   # by decreasing eigenvalue
    torch.testing.assert_close(q.T @ q, torch.eye(12, dtype=torch.float64))
