"""state_dict conformance, for every registered optimizer: checkpoints that do not fit fail with
a clear ValueError (and change nothing), checkpoints resume across a float32 <-> float64 cast of
the model, optimizers survive deepcopy and pickle mid-run, and name-keyed state dicts survive
model surgery. (Round trips at one dtype are in tests/test_base.py.)"""

import copy
import pickle

import pytest
import torch
from conformance_cases import (
    all_optimizers,
    assert_identical,
    assert_same_state,
    couples_group,
    flat,
    make,
    make_model,
    optimizer_kwargs,
    run,
    state_snapshot,
    via_torch_save,
    with_paths,
)
from torch import nn

import optforge as of
from helpers import SCALAR_STATE, two_groups

# ---- checkpoints that do not fit -----------------------------------------------------------


def stepped(info, params, steps=3, model=None, **overrides):
    opt = make(info, params, **overrides)
    if model is not None:
        run(model, opt, steps)
    return opt


@pytest.mark.parametrize("info", all_optimizers())
def test_another_group_count_is_refused(info):
    model = make_model()
    one = stepped(info, model.parameters(), model=model)
    two = stepped(info, two_groups(model, optimizer_kwargs(info.name)["lr"], 0.0), model=model)
    before = state_snapshot(two)
    with pytest.raises(ValueError, match=r"has 1 param group\(s\), this \w+ has 2"):
        two.load_state_dict(one.state_dict())
    with pytest.raises(ValueError, match=r"has 2 param group\(s\), this \w+ has 1"):
        one.load_state_dict(two.state_dict())
    assert_same_state(state_snapshot(two), before)


@pytest.mark.parametrize("info", all_optimizers())
def test_another_param_count_is_refused(info):
    model = make_model()
    extra = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    small = stepped(info, model.parameters(), model=model)
    big = stepped(info, [*model.parameters(), extra], model=model)
    before = state_snapshot(big)
    with pytest.raises(ValueError, match=r"param group 0: the loaded state dict has 6 parameter\(s\), "
                                         r"this optimizer's group has 7"):
        big.load_state_dict(small.state_dict())
    assert_same_state(state_snapshot(big), before)


@pytest.mark.parametrize("info", all_optimizers())
def test_state_that_does_not_fit_is_refused(info):
    """A state entry without a tensor the algorithm needs (another optimizer's checkpoint, or
    a truncated one), or with another shape, is refused by name instead of silently re-zeroed."""
    model = make_model()
    opt = stepped(info, model.parameters(), model=model)
    before = state_snapshot(opt)
    names = [n for n in before["state"][0] if n not in SCALAR_STATE]
    assert names, "every optimizer in the table keeps some state"
    for name in names:
        sd = copy.deepcopy(before)
        del sd["state"][0][name]
        if before["state"][0][name].numel() == 0:
            # a placeholder (Adafactor's unused factored entry): torch's checkpoints lack it,
            # so it may be missing; it is created again at the next step
            opt.load_state_dict(sd)
            opt.load_state_dict(copy.deepcopy(before))
        else:
            with pytest.raises(ValueError, match=rf"state of parameter 0 .* lacks \['{name}'\]"):
                opt.load_state_dict(sd)
        sd = copy.deepcopy(before)
        sd["state"][1][name] = torch.zeros(2, 2, dtype=torch.float64)
        with pytest.raises(ValueError, match=rf"state '{name}' of parameter 1 has shape \(2, 2\)"):
            opt.load_state_dict(sd)
    # another optimizer's checkpoint: MomentumSGD keeps only a velocity
    donor_model = make_model()
    donor = stepped(of.get_optimizer_info("momentum_sgd"), donor_model.parameters(), model=donor_model)
    if set(names) != {"velocity"}:
        with pytest.raises(ValueError, match="another optimizer"):
            opt.load_state_dict(donor.state_dict())
    with pytest.raises(ValueError, match="load_state_dict_by_name"):
        opt.load_state_dict(of.state_dict_by_name(opt, model))
    assert_same_state(state_snapshot(opt), before)


# ---- resuming across a dtype cast of the model ---------------------------------------------


def dtype_run(info, dtype, steps, model=None, opt=None):
    """Full-batch steps on a float64 batch cast to ``dtype`` (so both dtypes see the same data)."""
    if model is None:
        model = make_model(dtype=dtype)
        opt = make(info, model.parameters())
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(16, 2, 6, 6, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randn(16, 1, generator=gen, dtype=torch.float64).to(dtype)
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("src,dst", [(torch.float32, torch.float64), (torch.float64, torch.float32)],
                         ids=["f32-to-f64", "f64-to-f32"])
@pytest.mark.parametrize("info", all_optimizers())
def test_resume_across_a_dtype_cast(info, src, dst):
    """Save a ``src`` run, load model and optimizer state into a ``dst`` model (torch casts the
    state to the parameter's dtype, the step count stays float32), continue: the result follows
    an uninterrupted ``dst`` run as closely as an uninterrupted ``src`` run does (float32
    rounding, amplified by how sensitive the optimizer is on this problem), and restarting the
    optimizer instead is far off."""
    k, n = 8, 8
    ref, _ = dtype_run(info, dst, k + n)
    other, _ = dtype_run(info, src, k + n)
    model, opt = dtype_run(info, src, k)
    saved_model, saved_opt = via_torch_save(model.state_dict()), via_torch_save(opt.state_dict())

    resumed = make_model(seed=5, dtype=dst)
    resumed.load_state_dict(saved_model)
    resumed_opt = make(info, resumed.parameters())
    resumed_opt.load_state_dict(saved_opt)
    for p in resumed.parameters():
        st = resumed_opt.state[p]
        assert st["step"].dtype == torch.float32 and st["step"].item() == k
        assert all(v.dtype == dst for name, v in st.items() if name not in SCALAR_STATE)
    dtype_run(info, dst, n, resumed, resumed_opt)

    restarted = make_model(seed=5, dtype=dst)
    restarted.load_state_dict(saved_model)
    dtype_run(info, dst, n, restarted, make(info, restarted.parameters()))

    def err(m):
        return (flat(m.parameters()) - flat(ref.parameters())).abs().max().item()

    assert err(resumed) <= 3 * err(other) + 1e-6, (err(resumed), err(other))
    assert err(restarted) > 10 * err(resumed), (err(resumed), err(restarted))


# ---- deepcopy and pickle -------------------------------------------------------------------


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("info,fused", with_paths())
def test_copy_mid_run_continues_identically(info, fused, how):
    """Copy model and optimizer together mid-run (so the copy's groups hold the copied
    parameters); both then take identical steps, independently."""
    model = make_model()
    opt = make(info, two_groups(model, optimizer_kwargs(info.name)["lr"], 0.05), fused=fused)
    run(model, opt, 4)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    ids = {id(p) for p in model2.parameters()}
    assert all(id(p) in ids for g in opt2.param_groups for p in g["params"])
    assert_same_state(state_snapshot(opt2), state_snapshot(opt))
    a, b = run(model, opt, 5), run(model2, opt2, 5)
    assert_identical(a, b)
    assert not any(p.untyped_storage().data_ptr() == q.untyped_storage().data_ptr()
                   for p, q in zip(model.parameters(), model2.parameters()))
    assert all(opt2.state[p]["step"].item() == 9 for p in model2.parameters())


# ---- name-keyed state dicts ----------------------------------------------------------------


class Layers(nn.Module):
    """Independent layers, each with its own loss term, so one layer's path does not depend on
    the others: state loaded by name must continue exactly as if nothing had changed."""

    def __init__(self, spec: dict[str, tuple[int, int]], seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleDict({k: nn.Linear(i, o).double() for k, (i, o) in spec.items()})

    def loss(self):
        total = 0
        for name, layer in self.layers.items():
            gen = torch.Generator().manual_seed(sum(map(ord, name)))   # the layer's own data
            x = torch.randn(8, layer.in_features, generator=gen, dtype=torch.float64)
            y = torch.randn(8, layer.out_features, generator=gen, dtype=torch.float64)
            total = total + ((torch.tanh(layer(x)) - y) ** 2).mean()
        return total


def train(model, opt, steps):
    for _ in range(steps):
        opt.zero_grad()
        model.loss().backward()
        opt.step()


def layer_params(model, name):
    return flat(model.layers[name].parameters())


@pytest.mark.parametrize("info", all_optimizers())
def test_by_name_survives_reordered_parameters(info):
    """Positional loading would swap the states of reordered parameters; by name it cannot."""
    spec = {"a": (3, 4), "b": (4, 4), "c": (4, 2)}
    model = Layers(spec)
    opt = make(info, model.parameters())
    train(model, opt, 4)
    saved = via_torch_save(of.state_dict_by_name(opt, model))
    saved_model = copy.deepcopy(model.state_dict())
    assert set(saved["state"]) == {f"layers.{k}.{w}" for k in spec for w in ("weight", "bias")}
    train(model, opt, 5)

    fresh = Layers(spec, seed=9)
    fresh.load_state_dict(saved_model)
    reordered = list(reversed(list(fresh.parameters())))
    fresh_opt = make(info, reordered)
    report = of.load_state_dict_by_name(fresh_opt, fresh, saved)
    assert report == of.NameLoadReport([], [], [], [0])
    train(fresh, fresh_opt, 5)
    if couples_group(info):   # group-wide sums now add the tensors in another order
        torch.testing.assert_close(flat(fresh.parameters()), flat(model.parameters()), rtol=1e-5, atol=1e-7)
    else:
        assert torch.equal(flat(fresh.parameters()), flat(model.parameters()))


def layer_groups(model, lr, names_and_decay):
    """One param group per ``(layer names, weight decay)``; the second group at half the lr."""
    return [{"params": [p for k in names for p in model.layers[k].parameters()], "weight_decay": wd,
             "lr": lr * (1.0 if i == 0 else 0.5)} for i, (names, wd) in enumerate(names_and_decay)]


@pytest.mark.parametrize("info", all_optimizers())
def test_by_name_hyperparameters_follow_the_names_of_reordered_groups(info):
    """Groups built in another order: each takes the hyperparameters of the saved group that
    held its parameters (positionally, weight decay and lr would be swapped), and the run
    continues as the uninterrupted one."""
    spec = {"a": (3, 4), "b": (4, 4), "c": (4, 2)}
    lr = optimizer_kwargs(info.name)["lr"]
    model = Layers(spec)
    opt = make(info, layer_groups(model, lr, [("a", 0.1), ("bc", 0.0)]))
    train(model, opt, 3)
    saved = via_torch_save(of.state_dict_by_name(opt, model))
    saved_model = copy.deepcopy(model.state_dict())
    train(model, opt, 4)

    fresh = Layers(spec, seed=9)
    fresh.load_state_dict(saved_model)
    fresh_opt = make(info, layer_groups(fresh, lr, [("bc", 0.3), ("a", 0.2)]))
    report = of.load_state_dict_by_name(fresh_opt, fresh, saved)
    assert report.hyperparameters_from == [1, 0]
    assert [g["weight_decay"] for g in fresh_opt.param_groups] == [0.0, 0.1]
    assert [g["lr"] for g in fresh_opt.param_groups] == [lr * 0.5, lr]
    train(fresh, fresh_opt, 4)
    for k in spec:
        got, want = layer_params(fresh, k), layer_params(model, k)
        if couples_group(info):   # group-wide sums now add the tensors in another order
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(got, want), k


def test_by_name_groups_that_mix_saved_groups_are_refused_or_reported():
    """A group holding parameters saved in two groups (with other hyperparameters) cannot take
    both: strict refuses, naming them, and loads nothing; strict=False loads the state, keeps
    that group's own hyperparameters and says so."""
    spec = {"a": (3, 4), "b": (4, 4), "c": (4, 2)}
    model = Layers(spec)
    opt = of.AdamW(layer_groups(model, 1e-2, [("a", 0.1), ("bc", 0.0)]))
    train(model, opt, 3)
    saved = via_torch_save(of.state_dict_by_name(opt, model))
    merged_opt = of.AdamW(layer_groups(model, 1e-2, [("ab", 0.3), ("c", 0.2)]))
    before = state_snapshot(merged_opt)
    with pytest.raises(ValueError, match=r"param group 0 .* saved param groups 0 and 1"):
        of.load_state_dict_by_name(merged_opt, model, saved)
    assert_same_state(state_snapshot(merged_opt), before)
    report = of.load_state_dict_by_name(merged_opt, model, saved, strict=False)
    assert report.hyperparameters_from == [None, 1]
    assert [g["weight_decay"] for g in merged_opt.param_groups] == [0.3, 0.0]
    assert merged_opt.state[model.layers["a"].weight]["step"].item() == 3


@pytest.mark.parametrize("info", all_optimizers())
def test_by_name_survives_a_model_that_gained_and_lost_a_layer(info):
    old_spec = {"body": (3, 5), "old": (5, 5), "head": (5, 2)}
    new_spec = {"body": (3, 5), "new": (5, 6), "head": (5, 2)}
    model = Layers(old_spec)
    opt = make(info, model.parameters())
    train(model, opt, 4)
    saved = copy.deepcopy(of.state_dict_by_name(opt, model))
    saved_layers = {k: copy.deepcopy(model.layers[k].state_dict()) for k in ("body", "head")}
    train(model, opt, 5)                                  # the uninterrupted run

    surgery = Layers(new_spec, seed=7)
    for k, sd in saved_layers.items():
        surgery.layers[k].load_state_dict(sd)
    new_opt = make(info, surgery.parameters())
    before = state_snapshot(new_opt)
    with pytest.raises(ValueError) as err:
        of.load_state_dict_by_name(new_opt, surgery, saved)          # strict by default
    msg = str(err.value)
    for name in ("layers.new.weight", "layers.new.bias", "layers.old.weight", "layers.old.bias"):
        assert name in msg
    assert "missing" in msg and "unexpected" in msg
    assert_same_state(state_snapshot(new_opt), before)             # nothing loaded

    report = of.load_state_dict_by_name(new_opt, surgery, saved, strict=False)
    assert report.missing == ["layers.new.bias", "layers.new.weight"]
    assert report.unexpected == ["layers.old.bias", "layers.old.weight"]
    assert report.mismatched == []
    assert not new_opt.state[surgery.layers["new"].weight]          # fresh state for the new layer
    if couples_group(info):
        return            # the kept layers' steps depend on the new layer's: nothing more to compare
    train(surgery, new_opt, 5)
    for k in ("body", "head"):                                     # the kept layers never noticed
        assert torch.equal(layer_params(surgery, k), layer_params(model, k)), k
    assert new_opt.state[surgery.layers["body"].weight]["step"].item() == 9
    assert new_opt.state[surgery.layers["new"].weight]["step"].item() == 5


def test_by_name_reports_a_changed_shape_and_uses_param_names():
    info = of.get_optimizer_info("adamw")
    model = Layers({"body": (3, 5), "head": (5, 2)})
    opt = info.cls(model.named_parameters(), lr=1e-2)    # torch records param_names
    train(model, opt, 3)
    saved = of.state_dict_by_name(opt)                   # names from the optimizer itself
    assert set(saved["state"]) == {"layers.body.weight", "layers.body.bias", "layers.head.weight",
                                   "layers.head.bias"}
    wider = Layers({"body": (3, 5), "head": (5, 4)})
    wider_opt = info.cls(wider.named_parameters(), lr=1e-2)
    with pytest.raises(ValueError, match=r"shape changed: layers\.head\.bias, layers\.head\.weight"):
        of.load_state_dict_by_name(wider_opt, None, saved)
    report = of.load_state_dict_by_name(wider_opt, None, saved, strict=False)
    assert report.mismatched == ["layers.head.bias", "layers.head.weight"]
    assert wider_opt.state[wider.layers["body"].weight]["step"].item() == 3
    assert not wider_opt.state[wider.layers["head"].weight]


def test_by_name_refuses_what_it_cannot_name():
    model = Layers({"a": (2, 2)})
    stranger = nn.Parameter(torch.zeros(3))
    opt = of.AdamW([*model.parameters(), stranger])
    with pytest.raises(ValueError, match=r"parameter 2 of param group 0 \(shape \(3,\)\) is not a parameter"):
        of.state_dict_by_name(opt, model)
    with pytest.raises(ValueError, match="param_names"):
        of.state_dict_by_name(of.AdamW(model.parameters()))
    with pytest.raises(ValueError, match="not a state_dict_by_name"):
        of.load_state_dict_by_name(opt, model, opt.state_dict())


def test_by_name_works_for_torch_optimizers():
    model = Layers({"a": (2, 3), "b": (3, 2)})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, opt, 3)
    saved = copy.deepcopy(of.state_dict_by_name(opt, model))
    fresh_opt = torch.optim.AdamW(list(reversed(list(model.parameters()))), lr=1e-2)
    assert of.load_state_dict_by_name(fresh_opt, model, saved) == ([], [], [], [0])
    for p in model.parameters():
        assert torch.equal(fresh_opt.state[p]["exp_avg"], opt.state[p]["exp_avg"])


def test_by_name_moves_between_compiled_ddp_and_plain_models():
    """Names are the model's own: torch.compile's ``_orig_mod.`` and DDP's ``module.`` prefixes
    are dropped, whether they come from a wrapped model, from named_parameters() pairs, from
    the optimizer's param_names or from a checkpoint saved with them."""
    spec = {"a": (3, 4), "b": (4, 2)}
    own = {f"layers.{k}.{w}" for k in spec for w in ("weight", "bias")}
    model = Layers(spec)
    compiled = torch.compile(model)                   # wrapping only: nothing is compiled here
    opt = of.AdamW(compiled.named_parameters(), lr=1e-2)
    train(model, opt, 3)
    saved = via_torch_save(of.state_dict_by_name(opt, compiled))
    assert set(saved["state"]) == set(saved["param_shapes"]) == own
    assert of.state_dict_by_name(opt)["state"].keys() == own          # from param_names
    saved_model = copy.deepcopy(model.state_dict())
    train(model, opt, 4)

    ddp_names = [("module." + n, p) for n, p in model.named_parameters()]
    assert of.state_dict_by_name(opt, ddp_names)["state"].keys() == own
    prefixed = copy.deepcopy(saved)                   # as a checkpoint of a compiled DDP model
    prefixed["state"] = {"module._orig_mod." + n: v for n, v in saved["state"].items()}
    prefixed["param_shapes"] = {"module._orig_mod." + n: v for n, v in saved["param_shapes"].items()}
    prefixed["param_groups"] = [{**g, "params": ["module._orig_mod." + n for n in g["params"]]}
                                for g in saved["param_groups"]]
    for checkpoint, names in ((saved, lambda m: m), (saved, nn.DataParallel),
                              (prefixed, lambda m: m.named_parameters())):
        plain = Layers(spec, seed=5)
        plain.load_state_dict(saved_model)
        plain_opt = of.AdamW(plain.parameters(), lr=1e-2)
        report = of.load_state_dict_by_name(plain_opt, names(plain), copy.deepcopy(checkpoint))
        assert report == of.NameLoadReport([], [], [], [0])
        train(plain, plain_opt, 4)
        assert torch.equal(flat(plain.parameters()), flat(model.parameters()))
