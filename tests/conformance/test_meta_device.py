"""Every optimizer's step on parameters of torch's "meta" device, which holds no data: a step
that runs there creates nothing on another device and reads nothing back to the host, which
on a GPU would fail (a tensor on the wrong device) or wait for the device (``.item()``, a
Python ``if`` on a device tensor, ``.tolist()``). CPU-only CI has no GPU; this is its proxy
for both, for the optimizers the CUDA checks (test_devices.py) do not cover too."""

import pytest
import torch
from conformance_cases import INFOS, batch, low_bit_capable, make, make_model, mse

from optforge.lowbit.state import LowBitState

# Optimizers whose step reads the host by design, and why.
READS_HOST = {"prodigy": "its D estimate sums over the whole group, read once a step",
              "lbfgs": "its line search and stopping tests compare losses and norms on the host"}


@pytest.fixture(autouse=True)
def _draws_without_a_device_generator(monkeypatch):
    """PSGDKron draws its probes from a generator on the parameters' device, which meta lacks:
    there they come from torch's global one (the rest of its step runs as it is)."""
    from optforge.optimizers import kron

    seeded = kron.draw_generator

    def draw_generator(device, *keys):
        return None if torch.device(device).type == "meta" else seeded(device, *keys)

    monkeypatch.setattr(kron, "draw_generator", draw_generator)
    monkeypatch.setattr(kron, "probe", lambda grad, draws: torch.randn_like(grad))


def _paths():
    """Each optimizer's eager path: on meta (neither CPU nor CUDA) the default path is that too;
    torch's fused kernels run in the option sweep below."""
    out = []
    for info in INFOS:
        reads = READS_HOST.get(info.name)
        marks = [pytest.mark.xfail(reason=reads, strict=True)] if reads else []
        out.append(pytest.param(info, False, id=f"{info.name}-foreach", marks=marks))
    return out


def _train_on_meta(opt_factory, steps: int = 7):
    model = make_model(dtype=torch.float32).to("meta")
    opt = opt_factory(model.parameters())
    x, y = (t.to("meta") for t in batch(dtype=torch.float32))
    for _ in range(steps):
        opt.zero_grad()
        mse(model, x, y).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("info,fused", _paths())
def test_step_stays_on_the_parameters_device(info, fused):
    """Seven eager steps (past every table optimizer's first preconditioner or root update): the
    state lives beside its parameter, and nothing read a value back."""
    model, opt = _train_on_meta(lambda ps: make(info, ps, fused=fused))
    for p in model.parameters():
        assert p.device.type == "meta"
        for name, value in opt.state[p].items():
            if torch.is_tensor(value) and value.dim() > 0:
                assert value.device.type == "meta", name


@pytest.mark.parametrize("info", [pytest.param(i, id=i.name) for i in INFOS if low_bit_capable(i)])
def test_low_bit_step_stays_on_the_parameters_device(info):
    """The int8 state path: codes and scales on the device, decoded and encoded there."""
    def low_bit(params):
        return make(info, params, fused=False).configure(state_precision="int8", min_quantized_size=0)

    _, opt = _train_on_meta(low_bit, steps=3)
    coded = [v for st in opt.state.values() for v in st.values() if isinstance(v, LowBitState)]
    assert coded, "no state was stored in low bits"
    for x in coded:
        assert x.codes.device.type == "meta"
        assert x.scales is None or x.scales.device.type == "meta"


def test_a_host_read_fails_here():
    """The proxy catches what it is for: a step that reads a value (skip_nonfinite reads one
    flag a step, by design) or mixes in a CPU tensor."""
    info = next(i for i in INFOS if i.name == "adamw")
    with pytest.raises(RuntimeError, match="meta"):
        _train_on_meta(lambda ps: make(info, ps).configure(skip_nonfinite=True), steps=1)
    with pytest.raises(RuntimeError, match="device"):
        (torch.empty(3, device="meta") + torch.ones(3)).sum()


# torch's fused kernels without an implementation for meta tensors
NO_META_KERNEL = {"sgd": "_fused_sgd_", "adagrad": "_fused_adagrad_"}


def _option_inputs():
    """(info, kwargs) for every input of every record of the torch-style suite (each optimizer's
    options: torch's own inputs where torch has the optimizer, else each boolean flipped, both
    weight decay modes, maximize, variants), and each with fused=True where that runs torch's
    own fused kernel (not a compiled one); no capturable or differentiable settings."""
    try:
        from torch_optim_infos import OPTIM_INFOS, native_fused, runs_native_fused
    except pytest.skip.Exception as missing:          # torch's records need expecttest
        return [pytest.param(None, None, marks=pytest.mark.skip(reason=str(missing)))]
    out = []
    for info in OPTIM_INFOS:
        if info.only_supports_sparse_grads:
            continue                # SparseAdam: torch has no sparse layout on meta
        reads = READS_HOST.get(info.name)
        marks = [pytest.mark.xfail(reason=reads, strict=True)] if reads else []
        for inp in info.optim_inputs_func("cpu"):
            if any(inp.kwargs.get(k) for k in ("fused", "capturable", "differentiable")):
                continue
            out.append(pytest.param(info, inp.kwargs, id=f"{info.name}-{inp.desc}", marks=marks))
            fused = {**inp.kwargs, "fused": True}     # torch's own fused kernel, where it runs
            if (info.name not in NO_META_KERNEL and native_fused(info.optim_cls)
                    and runs_native_fused(info, fused)):
                out.append(pytest.param(info, fused, id=f"{info.name}-{inp.desc}-fused", marks=marks))
    return out


@pytest.mark.parametrize("info,kwargs", _option_inputs())
def test_every_option_stays_on_the_parameters_device(info, kwargs):
    """Five steps with each option setting: nothing read back, nothing from another device."""
    with torch.device("meta"):
        w, b = torch.nn.Parameter(torch.empty(5, 7)), torch.nn.Parameter(torch.empty(5))
    x = torch.empty(7, device="meta")
    opt = info.optim_cls([w, b], **kwargs)

    def closure():
        opt.zero_grad()
        loss = (w.mv(x) + b).pow(2).sum()
        loss.backward()
        return loss

    for _ in range(5):
        closure()
        if info.step_requires_closure:
            opt.step(closure)
        else:
            opt.step()
    assert all(v.device.type == "meta" for st in opt.state.values() for v in st.values()
               if torch.is_tensor(v) and v.dim() > 0)
