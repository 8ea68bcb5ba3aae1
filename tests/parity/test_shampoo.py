"""optforge.Shampoo against a per-tensor float64 reference of Meta's Distributed Shampoo
(facebookresearch/optimizers, ``distributed_shampoo``, at commit
f60660661194de26d3ee78bae6d15820ff8e583d; not on PyPI) on one device, with its default
root-inverse preconditioner: 50-step full trajectories, rtol 1e-10.

The reference below restates their algorithm tensor by tensor with other operations than
optforge's (unfolding matmuls for the factors and the preconditioning, ``torch.split`` for
the blocks), so the two agree to rounding only where the inverse roots are well conditioned:
the epsilon here (1e-4) keeps the noise eigenvalues of rank-deficient factors from being
amplified (with their default 1e-12, rounding alone changes trajectories; see the
docstring's warning)."""

from __future__ import annotations

import pytest
import torch

import optforge as of
from helpers import assert_moves, assert_same_trajectory, make_model, trajectory


def merge_dims(shape: tuple[int, ...], max_dim: int) -> tuple[int, ...]:
    """Dims of size 1 dropped; from the last dim backwards, a dim joins the one after it while
    their product stays <= max_dim."""
    kept = [d for d in shape if d != 1] or [1]
    merged = [kept.pop()]
    while kept:
        d = kept.pop()
        if d * merged[0] <= max_dim:
            merged[0] *= d
        else:
            merged.insert(0, d)
    return tuple(merged)


def split_blocks(x: torch.Tensor, max_dim: int) -> list[torch.Tensor]:
    pieces = [x]
    for dim in range(x.dim()):
        pieces = [q for piece in pieces for q in torch.split(piece, max_dim, dim=dim)]
    return pieces


def unfold(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.movedim(dim, 0).reshape(x.shape[dim], -1)


def mode_product(x: torch.Tensor, matrix: torch.Tensor, dim: int) -> torch.Tensor:
    moved = x.movedim(dim, 0)
    return (matrix @ moved.reshape(moved.shape[0], -1)).reshape(moved.shape).movedim(0, dim)


def inverse_root(a: torch.Tensor, exponent: float, eps: float) -> torch.Tensor:
    """(A + eps I)^(-exponent): eigh of the ridged matrix; eigenvalues below eps shifted to
    min + eps (their PerturbationConfig(perturb_before_computation=True))."""
    values, vectors = torch.linalg.eigh(a + eps * torch.eye(a.shape[0], dtype=a.dtype))
    low = values.min()
    if low < eps:
        values = values - low + eps
    return vectors @ torch.diag(values ** -exponent) @ vectors.T


class ReferenceShampoo:
    """Their DistributedShampoo on one device, for plain tensors (one param group)."""

    def __init__(self, params, *, lr, betas, epsilon, weight_decay, coupled, max_dim, frequency, start,
                 bias_correction, grafting, grafting_beta2, grafting_epsilon):
        self.params = list(params)
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, epsilon, weight_decay
        self.coupled, self.max_dim, self.frequency = coupled, max_dim, frequency
        self.start = frequency if start == -1 else start
        self.bias, self.grafting = bias_correction, grafting
        self.gb2, self.geps = grafting_beta2, grafting_epsilon
        self.t = 0
        self.state = {}
        for p in self.params:
            shape = merge_dims(tuple(p.shape), max_dim)
            blocks = split_blocks(torch.zeros(shape, dtype=p.dtype), max_dim)
            self.state[p] = dict(
                shape=shape, m=torch.zeros_like(p), v=torch.zeros_like(p),
                factors=[[torch.zeros(d, d, dtype=p.dtype) for d in b.shape] for b in blocks],
                roots=[[torch.eye(d, dtype=p.dtype) for d in b.shape] for b in blocks])

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        self.t += 1
        t = self.t
        amortize = t == self.start or (t > self.start and t % self.frequency == 0)
        for p in self.params:
            st = self.state[p]
            g = p.grad + self.wd * p if self.coupled else p.grad.clone()
            weight = 1.0 if self.b2 == 1 else 1 - self.b2
            bc2 = 1 - self.b2**t if self.bias and self.b2 < 1 else 1.0
            for gb, factors, roots in zip(split_blocks(g.reshape(st["shape"]), self.max_dim),
                                          st["factors"], st["roots"]):
                for i, factor in enumerate(factors):
                    gi = unfold(gb, i)
                    outer = gi @ gi.T
                    factor.copy_(self.b2 * factor + weight * outer if self.b2 != 1 else factor + outer)
                    if amortize:
                        roots[i] = inverse_root(factor / bc2, 1 / (2 * gb.dim()), self.eps)
            if self.grafting == "adagrad":
                st["v"] += g * g
            elif self.grafting in ("adam", "rmsprop"):
                st["v"] = self.gb2 * st["v"] + (1 - self.gb2) * g * g
            if self.b1:
                st["m"] = self.b1 * st["m"] + (1 - self.b1) * g
                g_bar = st["m"] / (1 - self.b1**t) if self.bias else st["m"]
            else:
                g_bar = g
            graft = None
            if self.grafting in ("adam", "rmsprop", "adagrad"):
                vbc = 1 - self.gb2**t if self.grafting == "adam" else 1.0
                graft = g_bar / ((st["v"] / vbc).sqrt() + self.geps)
            elif self.grafting == "sgd":
                graft = g_bar
            if graft is not None and t < self.start:
                d = graft
            else:
                parts = []
                graft_blocks = (split_blocks(graft.reshape(st["shape"]), self.max_dim) if graft is not None
                                else [None] * len(st["roots"]))
                for gb, roots, ab in zip(split_blocks(g_bar.reshape(st["shape"]), self.max_dim),
                                         st["roots"], graft_blocks):
                    pb = gb
                    for i, x in enumerate(roots):
                        pb = mode_product(pb, x, i)
                    if ab is not None:
                        pb = pb * (ab.norm() / (pb.norm() + 1e-16))
                    parts.append(pb)
                d = assemble(parts, st["shape"], self.max_dim)
            d = d.reshape(p.shape)
            if not self.coupled:
                d = d + self.wd * p
            p -= self.lr * d


def assemble(parts: list[torch.Tensor], shape: tuple[int, ...], max_dim: int) -> torch.Tensor:
    out = torch.empty(shape, dtype=parts[0].dtype)
    for view, part in zip(split_blocks(out, max_dim), parts):
        view.copy_(part)
    return out


BASE = dict(lr=1e-2, betas=(0.9, 0.999), epsilon=1e-4, weight_decay=0.01, max_preconditioner_dim=4,
            precondition_frequency=3, start_preconditioning_step=-1, use_bias_correction=True,
            grafting="adam", grafting_beta2=0.999, grafting_epsilon=1e-8)

CASES = {
    "adam-grafting-blocks": {},
    "merged-dims": dict(max_preconditioner_dim=1024, precondition_frequency=5, start_preconditioning_step=7,
                        epsilon=1e-3),
    "algoperf-betas": dict(betas=(0.95, 0.995), grafting_beta2=0.995, max_preconditioner_dim=8,
                           precondition_frequency=2),
    "no-grafting-sum": dict(grafting="none", betas=(0.9, 1.0), lr=1e-3, epsilon=1e-4),
    "adagrad-no-filter": dict(grafting="adagrad", betas=(0.0, 1.0), precondition_frequency=1),
    "rmsprop": dict(grafting="rmsprop", grafting_beta2=0.99, max_preconditioner_dim=6),
    "sgd-coupled-no-bias": dict(grafting="sgd", weight_decay=0.05, weight_decay_mode="coupled",
                                use_bias_correction=False, lr=3e-3),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_trajectory_matches_the_reference(case):
    kw = {**BASE, **CASES[case]}
    m_ours, m_ref = make_model(), make_model()
    ours = of.Shampoo(m_ours.parameters(), factor_matrix_dtype="float64", **kw)
    ref = ReferenceShampoo(
        m_ref.parameters(), lr=kw["lr"], betas=kw["betas"], epsilon=kw["epsilon"],
        weight_decay=kw["weight_decay"],
        coupled=kw.get("weight_decay_mode") == "coupled", max_dim=kw["max_preconditioner_dim"],
        frequency=kw["precondition_frequency"], start=kw["start_preconditioning_step"],
        bias_correction=kw["use_bias_correction"], grafting=kw["grafting"],
        grafting_beta2=kw["grafting_beta2"], grafting_epsilon=kw["grafting_epsilon"])
    a, b = trajectory(m_ours, ours), trajectory(m_ref, ref)
    assert_moves(a)
    assert_same_trajectory(a, b)


def test_the_blocks_are_theirs():
    assert merge_dims((3, 2, 3, 3), 8) == (3, 6, 3) == of.optimizers.shampoo.merged_shape((3, 2, 3, 3), 8)
    assert of.optimizers.shampoo.merged_shape((5, 48), 1024) == (240,)
    assert of.optimizers.shampoo.merged_shape((64, 3, 3, 3), 1024) == (64, 27)
    assert of.optimizers.shampoo.merged_shape((1, 1), 4) == (1,)
    blocks = of.optimizers.shampoo.Blocks.of((5, 48), 8)
    assert blocks.shape == (5, 48) and [(dims, len(s)) for dims, s in blocks.groups] == [((5, 8), 6)]
    assert blocks.factor_numel == 6 * (25 + 64)


def test_a_vector_in_blocks_matches_the_reference():
    """A 50-vector in blocks of 8 (six full blocks, stacked as one view, and a block of 2)."""
    torch.manual_seed(0)
    curvature = torch.rand(50, dtype=torch.float64) + 0.5
    w_ours = torch.nn.Parameter(torch.randn(50, dtype=torch.float64))
    w_ref = torch.nn.Parameter(w_ours.detach().clone())
    kw = dict(lr=1e-2, epsilon=1e-4, weight_decay=0.01)
    ours = of.Shampoo([w_ours], max_preconditioner_dim=8, precondition_frequency=2,
                      factor_matrix_dtype="float64", **kw)
    ref = ReferenceShampoo([w_ref], betas=(0.9, 0.999), coupled=False, max_dim=8, frequency=2, start=-1,
                           bias_correction=True, grafting="adam", grafting_beta2=0.999, grafting_epsilon=1e-8,
                           **kw)
    paths = ([], [])
    for _ in range(50):
        for w, opt, path in ((w_ours, ours, paths[0]), (w_ref, ref, paths[1])):
            opt.zero_grad()
            ((curvature * w**2).sum() + (w[:-1] * w[1:]).sum()).backward()
            opt.step()
            path.append(w.detach().clone())
    assert_moves(paths[0])
    assert_same_trajectory(*paths)
