"""AdamMini: full 50-step float64 trajectories, rtol 1e-10, against the authors' package
(``adam-mini`` 1.1.1, ``Adam_mini``) on a tiny transformer whose parameter names give every
kind of block (query/key per head, grouped-query keys included; embedding, values, output
projection, MLP and output head per row; norms per tensor; biases per entry), with and without
weight decay, built from ``model.named_parameters()`` and by ``create_optimizer``. The package
computes in the parameters' dtype: its one float32 number is a tensor's entry count, exact here."""

import pytest
import torch
from torch import nn

import optforge as of
from helpers import assert_moves, assert_same_trajectory

adam_mini = pytest.importorskip("adam_mini")

DIM, HEADS, KV_HEADS, VOCAB = 8, 4, 2, 11


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        hd = DIM // HEADS
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.q_proj = nn.Linear(DIM, DIM)
        # grouped-query: fewer key heads; no key bias: softmax cancels it, so its gradient is
        # rounding noise, which Adam's normalization would turn into steps no two codes share
        self.k_proj = nn.Linear(DIM, KV_HEADS * hd, bias=False)
        self.v_proj = nn.Linear(DIM, KV_HEADS * hd)
        self.o_proj = nn.Linear(DIM, DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))
        self.gate = nn.Parameter(torch.randn(DIM, DIM) * 0.1)   # a name no rule knows: one block

    def forward(self, x):
        b, n, _ = x.shape
        h = self.norm1(x)
        q = self.q_proj(h).view(b, n, HEADS, -1).transpose(1, 2)
        k, v = (f(h).view(b, n, KV_HEADS, -1).transpose(1, 2).repeat_interleave(HEADS // KV_HEADS, 1)
                for f in (self.k_proj, self.v_proj))
        a = torch.softmax(q @ k.transpose(-1, -2) / (DIM // HEADS) ** 0.5, dim=-1) @ v
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, n, DIM)) @ torch.tanh(self.gate)
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList([Block(), Block()])
        self.ln_f = nn.LayerNorm(DIM)   # "ln": no decay, one block
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        self.double()

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.ln_f(x))


def trajectory(model, opt, steps=50):
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        tokens = torch.randint(0, VOCAB, (4, 6), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
        opt.step()
        out.append(torch.cat([p.detach().flatten() for p in model.parameters()]).clone())
    return out


def reference(lr, betas, eps, weight_decay):
    model = TinyLM()
    opt = adam_mini.Adam_mini(model.named_parameters(), lr=lr, betas=betas, eps=eps,
                              weight_decay=weight_decay, dim=DIM, n_heads=HEADS, n_kv_heads=KV_HEADS,
                              verbose=False)
    return trajectory(model, opt)


CASES = [  # lr, betas, eps, weight_decay
    (1e-2, (0.9, 0.999), 1e-8, 0.0),
    (3e-3, (0.8, 0.95), 1e-6, 0.1),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"wd{c[3]}")
def test_matches_the_authors_package(case):
    lr, betas, eps, wd = case
    model = TinyLM()
    opt = of.AdamMini(model.named_parameters(), lr=lr, betas=betas, eps=eps, weight_decay=wd, dim=DIM,
                      n_heads=HEADS)
    mine = trajectory(model, opt)
    assert_moves(mine)
    assert_same_trajectory(mine, reference(*case))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"wd{c[3]}")
def test_create_optimizer_matches_the_authors_package(case):
    """The factory's decay rule (none for biases and norms) is the package's on this model."""
    lr, betas, eps, wd = case
    model = TinyLM()
    opt = of.create_optimizer(model, "adam_mini", lr=lr, betas=betas, eps=eps, weight_decay=wd, dim=DIM,
                              n_heads=HEADS)
    assert_same_trajectory(trajectory(model, opt), reference(*case))


def test_blocks_follow_the_names():
    model = TinyLM()
    opt = of.AdamMini(model.named_parameters(), dim=DIM, n_heads=HEADS, weight_decay=0.1)
    trajectory(model, opt, 1)
    shapes = {n: tuple(opt.state[p]["exp_avg_sq"].shape) for n, p in model.named_parameters()}
    assert shapes["layers.0.q_proj.weight"] == (HEADS, 1)
    assert shapes["layers.0.k_proj.weight"] == (KV_HEADS, 1)
    assert shapes["layers.0.v_proj.weight"] == (KV_HEADS * DIM // HEADS, 1)
    assert shapes["embed.weight"] == shapes["lm_head.weight"] == (VOCAB, 1)
    assert shapes["layers.0.mlp.0.weight"] == (2 * DIM, 1)
    assert shapes["layers.0.gate"] == shapes["layers.0.norm1.weight"] == (1, 1)
    assert shapes["layers.0.q_proj.bias"] == (DIM,)
    decay = {n for g in opt.param_groups if g["weight_decay"] for n in g["param_names"]}
    assert not any("norm" in n or "bias" in n for n in decay) and "layers.0.gate" in decay


def test_partition_key_and_unnamed_params():
    """Unnamed params are one block each; a group's ``partition`` overrides names."""
    w = nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    b = nn.Parameter(torch.randn(6, dtype=torch.float64))
    opt = of.AdamMini([{"params": [w]}, {"params": [b], "partition": "element"}])
    w.grad, b.grad = torch.ones_like(w), torch.ones_like(b)
    opt.step()
    assert opt.state[w]["exp_avg_sq"].shape == (1, 1) and opt.state[b]["exp_avg_sq"].shape == (6,)
    with pytest.raises(ValueError, match=r"AdamMini: a parameter of shape \(5, 3\).*dim=4, n_heads=2"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(5, 3))], "partition": "head", "dim": 4,
                             "n_heads": 2})
    assert len(opt.param_groups) == 2                       # the refused group is not kept
    with pytest.raises(ValueError, match="invalid partition='rows'"):
        of.AdamMini([{"params": [w], "partition": "rows"}])


def test_channels_last_kernel_steps_as_a_contiguous_one():
    """Row blocks of a channels-last (non-contiguous) kernel are its output channels."""
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(4, 3, 2, 2, dtype=torch.float64).to(memory_format=torch.channels_last))
    b = nn.Parameter(a.detach().contiguous().clone())
    opt = of.AdamMini([{"params": [a, b], "partition": "row"}], lr=0.1, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(4, 3, 2, 2, dtype=torch.float64)
        a.grad, b.grad = g.to(memory_format=torch.channels_last), g.clone()
        opt.step()
    assert not a.is_contiguous() and opt.state[a]["exp_avg_sq"].shape == (4, 1)
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-14, atol=0)
