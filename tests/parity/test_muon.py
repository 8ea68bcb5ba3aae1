"""Muon: float64 parity of the Muon groups with ``torch.optim.Muon`` (its Newton-Schulz run in
float64) and of the AdamW fallback groups with ``torch.optim.AdamW``, over 50 steps; conv
kernels against a per-tensor reference of Jordan's algorithm; the bf16 default against torch's
own bf16 iteration; and ``muon_param_groups``' split of transformer-like and conv models."""

import inspect

import pytest
import torch
from torch import nn

import optforge as of
from helpers import assert_moves, assert_same_trajectory, make_model, trajectory
from optforge.optimizers.muon import Muon, orthogonalize
from optforge.optimizers.newton_schulz import work_bytes

NS = (3.4445, -4.7750, 2.0315)


def mlp(seed=0):
    """2-D weights wide (12x72), tall (20x12) and a row (1x20), plus biases."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(72, 12), nn.Tanh(), nn.Linear(12, 20), nn.Tanh(),
                         nn.Linear(20, 1)).double()


def split(model, lr, weight_decay):
    """Two Muon groups (matrices) and one AdamW group (biases), each with its own lr and decay."""
    w = [m.weight for m in model if isinstance(m, nn.Linear)]
    b = [m.bias for m in model if isinstance(m, nn.Linear)]
    return ([{"params": w[:2], "lr": lr, "weight_decay": weight_decay},
             {"params": w[2:], "lr": lr * 0.5, "weight_decay": weight_decay * 0.3}],
            [{"params": b, "lr": lr * 0.1, "weight_decay": weight_decay * 0.5}])


class Both:
    """Two torch optimizers stepped as one."""

    def __init__(self, *opts):
        self.opts = opts

    def zero_grad(self):
        for o in self.opts:
            o.zero_grad()

    def step(self):
        for o in self.opts:
            o.step()


def reference(lr, weight_decay, momentum, nesterov, adjust_lr_fn, betas, eps):
    model = mlp()
    muon_groups, adamw_groups = split(model, lr, weight_decay)
    ref = Both(torch.optim.Muon(muon_groups, momentum=momentum, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn),
               torch.optim.AdamW(adamw_groups, betas=betas, eps=eps))
    return trajectory(model, ref)


def ours(lr, weight_decay, momentum, nesterov, adjust_lr_fn, betas, eps, ns_dtype="param"):
    model = mlp()
    muon_groups, adamw_groups = split(model, lr, weight_decay)
    groups = [{**g, "use_muon": True} for g in muon_groups] + [{**g, "use_muon": False} for g in adamw_groups]
    opt = of.Muon(groups, momentum=momentum, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype,
                  adamw_betas=betas, adamw_eps=eps)
    return trajectory(model, opt)


CASES = [  # lr, weight_decay, momentum, nesterov, adjust_lr_fn, adamw betas, adamw eps
    (0.02, 0.0, 0.95, True, "original", (0.9, 0.95), 1e-10),
    (0.02, 0.1, 0.95, False, "original", (0.9, 0.999), 1e-8),
    (3e-3, 0.1, 0.9, True, "match_rms_adamw", (0.8, 0.95), 1e-8),
    (3e-3, 0.0, 0.8, False, "match_rms_adamw", (0.9, 0.95), 1e-10),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[4]}-nesterov{c[3]}-wd{c[1]}")
def test_muon_matches_torch_muon_and_adamw(case, monkeypatch):
    # torch's Newton-Schulz casts to bf16 with ``Tensor.bfloat16``: make that a float64 copy
    monkeypatch.setattr(torch.Tensor, "bfloat16", lambda self, *a, **k: self.clone())
    ref = reference(*case)
    monkeypatch.undo()
    mine = ours(*case)
    assert_moves(mine)
    assert_same_trajectory(mine, ref)


def test_bf16_iteration_matches_torch_muon():
    """The default ``ns_dtype="bfloat16"``: torch's own (bf16) iteration, float64 params."""
    case = CASES[2]
    mine = ours(*case, ns_dtype="bfloat16")
    assert_moves(mine)
    assert_same_trajectory(mine, reference(*case))
    exact = ours(*case)                         # and bf16 is not float64: the option does something
    assert (mine[-1] - exact[-1]).abs().max() > 1e-6


def stacked_mlp(seed=0):
    """Same-shape matrices: two tall 24x16 and two wide 16x24 (stacked by optforge, one at a
    time by torch), with a 16x72 and a 1x16."""
    torch.manual_seed(seed)
    widths = (72, 16, 24, 16, 24, 16, 1)
    layers = [nn.Flatten()]
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).double()


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("batch_numel", [Muon.ns_batch_numel, 0], ids=["stacked", "one_at_a_time"])
def test_same_shape_stacks_match_torch_muon(nesterov, batch_numel, monkeypatch):
    monkeypatch.setattr(torch.Tensor, "bfloat16", lambda self, *a, **k: self.clone())
    model = stacked_mlp()
    mats = [p for p in model.parameters() if p.dim() == 2]
    ref = trajectory(model, Both(torch.optim.Muon(mats, lr=0.02, nesterov=nesterov),
                                 torch.optim.AdamW([p for p in model.parameters() if p.dim() == 1],
                                                   lr=0.02, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.1)))
    monkeypatch.undo()
    model = stacked_mlp()
    opt = of.Muon(model.parameters(), lr=0.02, nesterov=nesterov, ns_dtype="param")
    opt.ns_batch_numel = batch_numel
    mine = trajectory(model, opt)
    assert_moves(mine)
    assert_same_trajectory(mine, ref)


def peak_step_bytes(opt):
    """Peak of the bytes torch's CPU allocator holds during one step, above what it held before
    (the profiler's memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert events, "the profiler recorded no allocations"
    running = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):      # stable: ties keep their order
        running += e.nbytes()
        peak = max(peak, running)
    return peak


def test_step_temporaries_are_one_stack():
    """32 same-shape float32 matrices: a step's temporaries are those of one stack (its input,
    the bf16 iterates: under 4 float32 stacks' bytes), not the 32 matrices' (which an input per
    matrix would take), and grow with the stack size; they lie in one buffer, held between
    steps (optforge.scratch), so the next step allocates none of them."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(48, 96, generator=gen).requires_grad_() for _ in range(32)]
    for p in params:
        p.grad = torch.randn(48, 96, generator=gen)
    opt = of.Muon(params)
    opt.step()
    matrix = 48 * 96 * 4
    for per_stack in (2, 8):
        opt.ns_batch_numel = per_stack * 48 * 96
        peak = peak_step_bytes(opt)
        assert per_stack * matrix < peak < 4 * per_stack * matrix, (per_stack, peak)
        held = of.scratch.held_bytes(opt)
        assert per_stack * matrix < held < 4 * per_stack * matrix, (per_stack, held)
        assert peak_step_bytes(opt) <= peak - held, per_stack           # the buffer reused


def test_work_buffer_is_kept_within_4_bytes_per_param():
    """The step's buffer is kept between steps where it is at most 4 bytes per stacked param,
    and not where the step makes gradient temporaries (maximize) that the pool may keep too."""
    def held(shapes, **kwargs):
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt = of.Muon(params, **kwargs)
        opt.ns_batch_numel = 8 * 48 * 96
        for _ in range(2):
            opt.step()
        return of.scratch.held_bytes(opt) / sum(p.numel() for p in params)

    assert 0 < held([(48, 96)] * 32) <= 4              # stacks of 8: 1.6 bytes per param
    assert held([(48, 96)] * 32, maximize=True) == 0
    assert held([(48, 96)] * 8) == 0                   # one stack of 8: 6.5 bytes per param


# ---- conv kernels: a per-tensor reference of Jordan's algorithm ------------------------------------
def newton_schulz(x, steps=5, eps=1e-7):
    a, b, c = NS
    tall = x.size(0) > x.size(1)
    y = x.T if tall else x
    y = y / y.norm().clamp(min=eps)
    for _ in range(steps):
        gram = y @ y.T
        y = a * y + (b * gram + c * gram @ gram) @ y
    return y.T if tall else y


class JordanMuon(torch.optim.Optimizer):
    """Muon one tensor at a time, conv kernels as (out, in * kh * kw) matrices."""

    def __init__(self, params, lr, momentum, weight_decay):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            mu = group["momentum"]
            for p in group["params"]:
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(mu).add_(p.grad, alpha=1 - mu)
                u = ((1 - mu) * p.grad + mu * buf).reshape(len(p), -1)
                scale = max(1.0, u.size(0) / u.size(1)) ** 0.5
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.sub_(group["lr"] * scale * newton_schulz(u).reshape(p.shape))


def test_conv_kernels_match_per_tensor_reference():
    """The helpers' model: a (3, 2, 3, 3) conv kernel and two Linear weights by Muon (kernel as
    3 x 18), biases by AdamW; every group with its own lr and decay."""
    def groups(model):
        mats = [p for p in model.parameters() if p.dim() > 1]
        return ([{"params": mats[:2], "lr": 0.02, "weight_decay": 0.1},
                 {"params": mats[2:], "lr": 0.01, "weight_decay": 0.0}],
                [{"params": [p for p in model.parameters() if p.dim() == 1], "lr": 3e-3,
                  "weight_decay": 0.01}])
    model = make_model()
    m, a = groups(model)
    ref = trajectory(model, Both(JordanMuon(m, lr=0.02, momentum=0.95, weight_decay=0.0),
                                 torch.optim.AdamW(a, betas=(0.9, 0.95), eps=1e-10)))
    model = make_model()
    m, a = groups(model)
    opt = of.Muon([{**g, "use_muon": True} for g in m] + [{**g, "use_muon": False} for g in a],
                  ns_dtype="param")
    mine = trajectory(model, opt)
    assert_moves(mine)
    assert_same_trajectory(mine, ref)


def test_plain_param_list_routes_vectors_to_adamw():
    """No ``use_muon`` key: matrices and kernels get Muon, 1-D params AdamW, at the group's lr."""
    a, b = make_model(), make_model()
    auto = trajectory(a, of.Muon(a.parameters(), lr=0.01, weight_decay=0.1, ns_dtype="param"))
    mats = [p for p in b.parameters() if p.dim() > 1]
    vecs = [p for p in b.parameters() if p.dim() <= 1]
    explicit = of.Muon([{"params": mats, "use_muon": True}, {"params": vecs, "use_muon": False}],
                       lr=0.01, weight_decay=0.1, ns_dtype="param")
    assert_same_trajectory(auto, trajectory(b, explicit), rtol=0, atol=0)


def test_use_muon_group_refuses_vectors():
    model = make_model()
    with pytest.raises(ValueError, match=r"shape \(3,\).*muon_param_groups"):
        of.Muon([{"params": list(model.parameters()), "use_muon": True}])
    opt = of.Muon([{"params": [model[0].weight], "use_muon": True}])
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        opt.add_param_group({"params": [model[2].bias], "use_muon": True})
    assert len(opt.param_groups) == 1


def test_defaults_match_references():
    """torch.optim.Muon's signature (order and defaults); the AdamW fallback's are Jordan's
    (MuonWithAuxAdam: betas (0.9, 0.95), eps 1e-10)."""
    ref = inspect.signature(torch.optim.Muon).parameters
    mine = inspect.signature(of.Muon).parameters
    assert list(mine)[:len(ref)] == list(ref)
    for name, p in ref.items():
        assert mine[name].default == p.default, name
    assert of.Muon(mlp().parameters()).defaults["ns_coefficients"] == ref["ns_coefficients"].default
    assert (mine["adamw_betas"].default, mine["adamw_eps"].default) == ((0.9, 0.95), 1e-10)


def test_orthogonalize_flattens_singular_values():
    x = torch.randn(20, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(of.optimizers.muon.orthogonalize(x, dtype=None))
    assert s.min() > 0.6 and s.max() < 1.25


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (3, 24, 40), (3, 40, 24)])
def test_orthogonalize_into_a_work_buffer(shape):
    """With a work buffer (as Muon's step) the iterates are written into it, bit for bit the
    results without one; a buffer too small or not bytes is refused before anything is written."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).bfloat16()
    ref = orthogonalize(x, dtype=None)
    for overwrite in (False, True):
        work = torch.empty(work_bytes(shape, torch.bfloat16, in_place=overwrite), dtype=torch.uint8)
        got = orthogonalize(x.clone(), dtype=None, overwrite=overwrite, work=work)
        assert torch.equal(got, ref) and got.stride() == ref.stride()
        assert work.data_ptr() <= got.data_ptr() < work.data_ptr() + work.numel()
    before = x.clone()
    with pytest.raises(ValueError, match="too small"):
        orthogonalize(x, dtype=None, overwrite=True, work=work[:-64])
    with pytest.raises(TypeError, match="uint8"):
        orthogonalize(x, dtype=None, overwrite=True, work=work.view(torch.bfloat16))
    assert torch.equal(x, before)


# ---- muon_param_groups ------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)


class TinyLM(nn.Module):
    def __init__(self, vocab=50, d=16, tied=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos_embed = nn.Parameter(torch.zeros(8, d))
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight


def routed(groups, model):
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in groups if g["use_muon"] for p in g["params"]}
    adamw = {names[id(p)] for g in groups if not g["use_muon"] for p in g["params"]}
    assert not muon & adamw
    return muon, adamw


def test_split_of_a_transformer():
    model = TinyLM()
    muon, adamw = routed(of.muon_param_groups(model), model)
    hidden = {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("qkv", "proj", "fc1", "fc2")}
    assert muon == hidden
    assert {"embed.weight", "pos_embed", "lm_head.weight", "blocks.0.norm1.weight",
            "blocks.1.qkv.bias"} <= adamw
    assert len(muon) + len(adamw) == len(list(model.parameters()))
    # overrides: a name pattern, and a predicate that decides first
    muon, adamw = routed(of.muon_param_groups(model, adamw_names=("*.fc2.weight",)), model)
    assert "blocks.0.fc2.weight" in adamw and "blocks.0.fc1.weight" in muon
    muon, _ = routed(of.muon_param_groups(model, adamw_names=()), model)   # no name rule
    assert "pos_embed" in muon
    muon, _ = routed(of.muon_param_groups(model, use_muon=lambda n, p: True if n == "embed.weight" else None),
                     model)
    assert "embed.weight" in muon
    tied = TinyLM(tied=True)
    muon, adamw = routed(of.muon_param_groups(tied), tied)
    assert "embed.weight" in adamw and muon == hidden


def test_head_by_vocabulary_and_by_position():
    model = TinyLM()
    model.out = model.lm_head                  # another name: found as the vocabulary projection
    del model.lm_head
    _, adamw = routed(of.muon_param_groups(model), model)
    assert "out.weight" in adamw
    mlp_model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10))
    muon, adamw = routed(of.muon_param_groups(mlp_model), mlp_model)
    assert muon == {"0.weight", "2.weight"} and "4.weight" in adamw      # the final Linear


def test_split_of_a_conv_net():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.Conv2d(16, 16, 3, groups=16),
                          nn.Conv2d(16, 32, 1), nn.Flatten(), nn.Linear(32, 10))
    muon, adamw = routed(of.muon_param_groups(model, adamw_lr=1e-3), model)
    assert muon == {"0.weight", "3.weight"}
    assert {"2.weight", "5.weight", "1.weight", "0.bias"} <= adamw       # depthwise, head, norm
    assert all(g["lr"] == 1e-3 for g in of.muon_param_groups(model, adamw_lr=1e-3) if not g["use_muon"])


def test_create_optimizer_splits_and_keeps_decay_groups():
    model = TinyLM()
    opt = of.create_optimizer(model, "muon", lr=0.01, weight_decay=0.1)
    assert isinstance(opt, of.Muon)
    by_kind = {(g["use_muon"], g["weight_decay"]) for g in opt.param_groups}
    assert (True, 0.1) in by_kind and (False, 0.0) in by_kind           # 1-D params: no decay
    muon, adamw = routed(opt.param_groups, model)
    assert "embed.weight" in adamw and "blocks.0.qkv.weight" in muon
    for g in opt.param_groups:                                           # decay follows the factory
        assert all((p.dim() > 1) == (g["weight_decay"] > 0) for p in g["params"])
    x = torch.randint(0, 50, (4, 8))
    loss = (model.lm_head(model.embed(x) + model.pos_embed) ** 2).mean()
    loss = loss + sum(p.sum() for p in model.parameters())
    loss.backward()
    opt.step()


def test_ns_coefficients_is_a_checked_group_key():
    model = mlp()
    cubic = of.Muon([{"params": [model[1].weight], "ns_coefficients": (1.5, -0.5, 0.0)}], ns_dtype="param")
    assert cubic.param_groups[0]["ns_coefficients"] == (1.5, -0.5, 0.0)
    trajectory(model, cubic, steps=2)
    with pytest.raises(ValueError, match=r"ns_coefficients=\(1, 2\)"):
        of.Muon([{"params": [model[1].weight], "ns_coefficients": (1, 2)}])
