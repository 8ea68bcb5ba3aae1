"""create_optimizer, the param-group builders, optimizer-args parsing and the example script."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import optforge as of
from optforge.factory import unwrap_model
from optforge.registry import list_optimizers

ROOT = Path(__file__).resolve().parents[1]


# ---- a model with every kind of parameter -----------------------------------------------------
class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)
        self.gamma = nn.Parameter(torch.ones(4, 4))       # 2-D, excluded by the block's own list

    def no_weight_decay(self):
        return {"gamma"}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.pos = nn.Parameter(torch.zeros(1, 3, 4))     # 3-D, in no_weight_decay()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.gn = nn.GroupNorm(1, 2)
        self.pre = nn.LayerNorm((2, 3, 3))                # 3-D norm weight: caught by module type
        self.norm_proj = nn.Linear(4, 4)                  # "norm" in the name, but a Linear
        self.blocks = nn.ModuleList([Block(), Block()])
        self.rms = nn.RMSNorm(4)
        self.rel_bias_table = nn.Parameter(torch.zeros(3, 3))  # keyword from no_weight_decay_keywords
        self.scale = nn.Parameter(torch.tensor(1.0))      # 0-D
        self.head = nn.Linear(4, 3)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def no_weight_decay(self):
        return {"pos"}

    def no_weight_decay_keywords(self):
        return {"bias_table"}


NO_DECAY = {
    "pos", "conv.bias", "bn.weight", "bn.bias", "gn.weight", "gn.bias", "pre.weight", "pre.bias",
    "norm_proj.bias", "rms.weight", "rel_bias_table", "scale", "head.bias",
    *(f"blocks.{i}.{n}" for i in range(2) for n in ("fc.bias", "ln.weight", "ln.bias", "gamma")),
}
DECAY = {"embed.weight", "conv.weight", "norm_proj.weight", "head.weight",
         "blocks.0.fc.weight", "blocks.1.fc.weight"}
FROZEN = {"frozen.weight", "frozen.bias"}


def _membership(model: nn.Module, groups: list[dict]) -> dict[str, float]:
    """name -> the weight decay of the group holding it (absent when in no group)."""
    names = {id(p): n for n, p in unwrap_model(model).named_parameters()}
    out: dict[str, float] = {}
    for g in groups:
        for p in g["params"]:
            assert names[id(p)] not in out, f"{names[id(p)]} in two groups"
            out[names[id(p)]] = g["weight_decay"]
    return out


def test_model_covers_every_case():
    assert {n for n, _ in Net().named_parameters()} == NO_DECAY | DECAY | FROZEN


def test_weight_decay_groups_parameter_by_parameter():
    model = Net()
    got = _membership(model, of.param_groups_weight_decay(model, 0.05))
    for name in NO_DECAY:
        assert got.get(name) == 0.0, name
    for name in DECAY:
        assert got.get(name) == 0.05, name
    for name in FROZEN:
        assert name not in got, name


def test_skip_list_and_keywords_arguments():
    model = Net()
    groups = of.param_groups_weight_decay(model, 0.1, skip_list=("head", "blocks.*.fc.weight"),
                                          skip_keywords=("embed",))
    got = _membership(model, groups)
    for name in ("head.weight", "blocks.0.fc.weight", "blocks.1.fc.weight", "embed.weight"):
        assert got[name] == 0.0, name
    assert got["conv.weight"] == got["norm_proj.weight"] == 0.1


class DistributedDataParallel(nn.Module):
    """Stands in for torch's DDP (which needs a process group): a wrapper holding `.module`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


class NotAWrapper(nn.Module):
    """A user model that happens to have a submodule named `module`: must not be unwrapped."""

    def __init__(self) -> None:
        super().__init__()
        self.module = nn.Linear(4, 4)
        self.extra = nn.Linear(4, 4)


@pytest.mark.filterwarnings("ignore:.*script_method.*:DeprecationWarning")  # torch._dynamo import
@pytest.mark.parametrize("wrap", [
    lambda m: m,
    DistributedDataParallel,
    nn.DataParallel,                                       # works on CPU without devices
    torch.compile,                                         # OptimizedModule, not compiled until called
    lambda m: torch.compile(DistributedDataParallel(m)),
    lambda m: DistributedDataParallel(torch.compile(m)),
], ids=["plain", "ddp", "dataparallel", "compile", "compile(ddp)", "ddp(compile)"])
def test_wrapped_models_give_the_same_groups(wrap):
    model = Net()
    wrapped = wrap(model)
    assert unwrap_model(wrapped) is model
    got = _membership(model, of.param_groups_weight_decay(wrapped, 0.05))
    assert {n for n, wd in got.items() if wd == 0.0} == NO_DECAY   # no_weight_decay() still found
    assert {n for n, wd in got.items() if wd != 0.0} == DECAY
    opt = of.create_optimizer(wrapped, "adamw", weight_decay=0.05)
    assert _membership(model, opt.param_groups) == got


def test_a_module_attribute_alone_does_not_unwrap():
    model = NotAWrapper()
    assert unwrap_model(model) is model
    groups = of.param_groups_weight_decay(model, 0.1)
    assert sum(len(g["params"]) for g in groups) == 4


# ---- create_optimizer ------------------------------------------------------------------------
def test_create_optimizer_splits_only_with_weight_decay():
    model = Net()
    opt = of.create_optimizer(model, "adamw", lr=3e-4, weight_decay=0.05)
    assert isinstance(opt, of.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.05]
    assert all(g["lr"] == 3e-4 for g in opt.param_groups)
    assert _membership(model, opt.param_groups) == _membership(
        model, of.param_groups_weight_decay(model, 0.05))

    adam = of.create_optimizer(model, "adam")               # Adam's default decay is 0: one group
    assert len(adam.param_groups) == 1 and adam.param_groups[0]["weight_decay"] == 0.0
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in adam.param_groups[0]["params"]} == trainable   # frozen left out

    flat = of.create_optimizer(model, "adamw", weight_decay=0.1, filter_bias_and_bn=False)
    assert len(flat.param_groups) == 1 and flat.param_groups[0]["weight_decay"] == 0.1


def test_none_means_the_optimizers_defaults():
    model = nn.Linear(3, 2)
    for info in list_optimizers(with_info=True):
        opt = of.create_optimizer(model, info.name)
        for key in ("lr", "weight_decay"):
            if key in info.defaults:
                assert opt.defaults[key] == info.defaults[key], (info.name, key)
    adamw = of.create_optimizer(Net(), "adamw")              # AdamW's own 1e-2, with the split
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.0, 1e-2]


def test_kwargs_reach_the_optimizer():
    opt = of.create_optimizer(nn.Linear(3, 2), "sgd", lr=0.1, momentum=0.9, nesterov=True)
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"]) == (0.1, 0.9, True)


def _case_variants(name: str) -> set[str]:
    return {name, name.upper(), name.lower(), name.title(), f"  {name} "}


def test_every_name_and_alias_resolves_case_insensitively():
    model = nn.Linear(3, 2)
    infos = list_optimizers(with_info=True)
    assert infos
    for info in infos:
        for name in (info.name, *info.aliases):
            for variant in _case_variants(name):
                assert type(of.create_optimizer(model, variant)) is info.cls, variant
    assert type(of.create_optimizer(model, "LodeW")) is of.Compass
    assert type(of.create_optimizer(model, "momentumsgd")) is of.MomentumSGD
    assert type(of.create_optimizer(model, "momentum_sgd")) is of.MomentumSGD
    assert type(of.create_optimizer(model, "amsgrad")) is of.AMSGrad


def test_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match=r"unknown optimizer 'adamx'.*'adam'"):
        of.create_optimizer(nn.Linear(3, 2), "adamx")


def test_unknown_kwarg_is_an_error_naming_it_and_the_valid_ones():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError) as err:
        of.create_optimizer(model, "sgd", betas=(0.9, 0.99))
    msg = str(err.value)
    assert "'betas'" in msg and "SGD" in msg
    for valid in ("lr", "momentum", "nesterov", "weight_decay"):
        assert valid in msg
    with pytest.raises(ValueError, match=r"'weight_decy' \(did you mean 'weight_decay'\?\)"):
        of.create_optimizer(model, "adamw", weight_decy=0.1)
    with pytest.raises(ValueError, match=r"'layer_decy' \(did you mean 'layer_decay'\?\)"):
        of.create_optimizer(model, "adamw", layer_decy=0.7)
    with pytest.raises(ValueError, match="amp_fac"):                 # valid for Compass only
        of.create_optimizer(model, "adam", amp_fac=2.0)
    assert of.create_optimizer(model, "LodeW", amp_fac=3.0).defaults["amp_fac"] == 3.0


def test_params_and_groups_pass_through():
    a, b = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2))
    opt = of.create_optimizer([a, b], "sgd", lr=0.5)
    assert opt.param_groups[0]["params"] == [a, b]
    opt = of.create_optimizer([{"params": [a], "lr_scale": 0.25}, {"params": [b], "lr": 0.3}], "sgd", lr=0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.125, 0.3]
    opt = of.create_optimizer([{"params": [a], "lr_scale": 0.5}], "adam")      # default lr 1e-3
    assert opt.param_groups[0]["lr"] == 0.5e-3
    with pytest.raises(ValueError, match="layer_decay needs the model"):
        of.create_optimizer([a, b], "sgd", layer_decay=0.5)


# ---- layer-wise lr decay ---------------------------------------------------------------------
class TinyViT(nn.Module):
    def __init__(self, depth: int = 3, d: int = 4) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, d))
        self.patch_embed = nn.Linear(6, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d)) for _ in range(depth))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 2)

    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}


def _expected_layer(name: str, depth: int = 3) -> int:
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1                                        # norm, head


def test_layer_decay_groups_parameter_by_parameter():
    model = TinyViT()
    lr, decay = 0.1, 0.5
    opt = of.create_optimizer(model, "sgd", lr=lr, weight_decay=0.05, layer_decay=decay)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for g in opt.param_groups:
        for p in g["params"]:
            name = names[id(p)]
            seen.add(name)
            layer = _expected_layer(name)
            assert g["layer_id"] == layer, name
            assert g["lr_scale"] == decay ** (4 - layer), name
            assert g["lr"] == pytest.approx(lr * decay ** (4 - layer), rel=1e-15), name
            no_decay = p.ndim <= 1 or name in ("cls_token", "pos_embed")
            assert g["weight_decay"] == (0.0 if no_decay else 0.05), name
    assert seen == set(names.values())


def test_layer_decay_scale_is_applied_by_the_optimizer_step():
    model = TinyViT()
    opt = of.create_optimizer(model, "sgd", lr=0.1, layer_decay=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    for n, p in model.named_parameters():
        step = (before[n] - p.detach()).flatten()[0].item()
        assert step == pytest.approx(0.1 * 0.5 ** (4 - _expected_layer(n)), rel=1e-6), n


def test_layer_id_fn_and_builder_without_lr():
    model = TinyViT()
    groups = of.param_groups_layer_decay(model, 0.0, 0.5,
                                         layer_id_fn=lambda n: 0 if n.startswith("head") else None)
    head = [g for g in groups if any(p is model.head.weight for p in g["params"])][0]
    assert head["layer_id"] == 0 and head["lr_scale"] == 0.5 ** 4 and "lr" not in head
    assert {g["weight_decay"] for g in groups} == {0.0}
    opt = torch.optim.SGD(groups, lr=1.0)
    of.set_lr(opt, 0.2)                                     # the documented fix-up for torch optimizers
    assert [g["lr"] for g in opt.param_groups] == [0.2 * g["lr_scale"] for g in opt.param_groups]


def test_layer_scale_survives_torch_schedulers():
    model = TinyViT()
    opt = of.create_optimizer(model, "adamw", lr=1e-3, layer_decay=0.75)
    scales = [g["lr_scale"] for g in opt.param_groups]
    assert len(set(scales)) == 5
    step = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    lam = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (t + 1))
    for _ in range(5):
        opt.step()
        step.step()
        lam.step()
        lrs = [g["lr"] for g in opt.param_groups]
        head = lrs[scales.index(1.0)]
        assert lrs == pytest.approx([head * s for s in scales], rel=1e-12)


# ---- optimizer args --------------------------------------------------------------------------
def test_parse_optimizer_args_types():
    got = of.parse_optimizer_args([
        "betas=0.9,0.99", "eps=1e-8", "nesterov=true", "amsgrad=False", "flag=TRUE", "centralization=1",
        "n=-3", "x=.5", "mode=decoupled", "clip=none", "other=None", "one=0.9,", "br=(1,2)",
        "empty=()", "quoted='1,2'", "expr=a=b",
    ])
    assert got == {
        "betas": (0.9, 0.99), "eps": 1e-8, "nesterov": True, "amsgrad": False, "flag": True,
        "centralization": 1, "n": -3, "x": 0.5, "mode": "decoupled", "clip": None, "other": None,
        "one": (0.9,), "br": (1, 2), "empty": (), "quoted": "1,2", "expr": "a=b",
    }
    assert type(got["centralization"]) is int and type(got["eps"]) is float
    assert of.parse_optimizer_args(None) == {} and of.parse_optimizer_args([]) == {}
    assert of.parse_optimizer_args("lr=0.1 momentum=0.9") == {"lr": 0.1, "momentum": 0.9}


@pytest.mark.parametrize("tokens,bad", [
    (["lr=0.1", "momentum"], "momentum"),
    (["=0.1"], "=0.1"),
    (["lr="], "lr="),
    (["lr=0.1", "lr=0.2"], "lr=0.2"),
    (["--lr=0.1"], "--lr=0.1"),
    (["betas=0.9,,0.99"], "betas=0.9,,0.99"),
])
def test_malformed_optimizer_args_name_the_token(tokens, bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        of.parse_optimizer_args(tokens)


def _parser(**flags) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train")
    of.add_optimizer_args(parser)
    for flag, default in flags.items():
        parser.add_argument(f"--{flag}", type=float, default=default)
    return parser


def test_argparse_helper_builds_the_optimizer():
    model = nn.Linear(3, 2)
    args = _parser().parse_args(
        ["--optimizer_type", "LodeW", "--optimizer_args", "amp_fac=2", "centralization=1"])
    assert args.optimizer_args == ["amp_fac=2", "centralization=1"]
    opt = of.optimizer_from_args(model, args)
    assert type(opt) is of.Compass
    assert opt.defaults["amp_fac"] == 2 and opt.defaults["centralization"] == 1

    default = _parser().parse_args([])
    assert default.optimizer_type == "adamw" and default.optimizer_args == []
    assert type(of.optimizer_from_args(model, default)) is of.AdamW


def test_script_flags_pass_through_and_optimizer_args_win():
    model = nn.Linear(3, 2)
    parser = _parser(lr=0.05, weight_decay=None)
    opt = of.optimizer_from_args(model, parser.parse_args(["--optimizer_type", "sgd"]))
    assert opt.defaults["lr"] == 0.05 and opt.defaults["weight_decay"] == 0.0
    args = parser.parse_args(["--optimizer_type", "sgd", "--weight_decay", "0.1",
                              "--optimizer_args", "lr=0.2", "momentum=0.9"])
    opt = of.optimizer_from_args(model, args)
    assert (opt.defaults["lr"], opt.defaults["weight_decay"], opt.defaults["momentum"]) == (0.2, 0.1, 0.9)


def test_argparse_helper_rejects_bad_input_at_parse_time(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["--optimizer_type", "lodw"])
    assert "'lodew'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parser().parse_args(["--optimizer_args", "amp_fac=2", "centralization"])
    assert "'centralization'" in capsys.readouterr().err
    args = _parser().parse_args(["--optimizer_type", "sgd", "--optimizer_args", "nesterov=1"])
    with pytest.raises(ValueError, match="nesterov=1"):       # 1 is an int, not a bool
        of.optimizer_from_args(nn.Linear(3, 2), args)


# ---- the example script -------------------------------------------------------------------------
def test_train_digits_example_runs_and_learns():
    pytest.importorskip("sklearn")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_digits.py"), "--optimizer_type", "LodeW",
         "--optimizer_args", "amp_fac=2", "centralization=1", "--epochs", "6"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "optimizer: Compass" in proc.stdout
    accuracy = float(re.search(r"test accuracy: ([0-9.]+)", proc.stdout).group(1))
    assert accuracy > 0.9, proc.stdout


def test_mars_no_decay_group_gets_no_1d_decay_either():
    """MARS decays non-matrix tensors by ``weight_decay_1d`` (0.1 by default); the factory's
    no-decay group (biases, norms) must not decay through it."""
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    opt = of.create_optimizer(model, "mars", lr=1e-2, weight_decay=0.1)
    by_decay = {g["weight_decay"]: g for g in opt.param_groups}
    assert by_decay[0.0]["weight_decay_1d"] == 0.0
    assert by_decay[0.1]["weight_decay_1d"] == opt.defaults["weight_decay_1d"] == 0.1
    before = [p.detach().clone() for p in by_decay[0.0]["params"]]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()                       # zero gradients: only decay could move a parameter
    assert all(torch.equal(a, p) for a, p in zip(before, by_decay[0.0]["params"]))
    explicit = of.create_optimizer(model, "mars", weight_decay=0.1, weight_decay_1d=0.05)
    assert {g["weight_decay_1d"] for g in explicit.param_groups} == {0.0, 0.05}
