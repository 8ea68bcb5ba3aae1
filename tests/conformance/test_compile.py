"""torch.compile, for every registered optimizer on the foreach and the fused path: a compiled
training step (forward, backward and ``opt.step()`` in one compiled function) and a compiled
``opt.step`` run, give the eager result, and do not recompile when an LR scheduler changes the
lr every step (float or tensor lr). The optimizer update runs outside the graph (one graph
break: it reads step counts on the host); ``fused=True`` runs its own compiled kernel."""

import pytest
import torch
from conformance_cases import flat, make, make_model, mse, optimizer_kwargs, with_paths
from torch._dynamo.testing import CompileCounter

from helpers import batch


def train_step(model, opt, x, y):
    opt.zero_grad()
    loss = mse(model, x, y)
    loss.backward()
    opt.step()
    return loss


def run(info, fused, lr_kind, compile_what=None, backend=None, steps=8):
    """Params after ``steps`` steps, and the number of frames compiled after each step."""
    if compile_what:
        torch._dynamo.reset()
    model = make_model(dtype=torch.float32)
    lr = optimizer_kwargs(info.name)["lr"]
    opt = make(info, model.parameters(), lr=torch.tensor(lr) if lr_kind == "tensor" else lr, fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k))
    x, y = (t.float() for t in batch())
    step, frames = train_step, []
    if compile_what == "train_step":
        step = torch.compile(train_step, backend=backend)
    elif compile_what == "opt.step":
        compiled = torch.compile(opt.step, backend=backend)

        def step(model, opt, x, y):
            opt.zero_grad()
            loss = mse(model, x, y)
            loss.backward()
            compiled()
            return loss
    for _ in range(steps):
        step(model, opt, x, y)
        sched.step()
        frames.append(getattr(backend, "frame_count", None))
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(lr / (steps + 1))   # it did change
    return flat(model.parameters()), frames


def cases():
    """Every optimizer's foreach path with float and tensor lr, compiling the training step or
    just ``opt.step``; its fused path once (each fused case recompiles its kernel: seconds)."""
    out = []
    for p in with_paths():
        info, fused = p.values
        for lr_kind in ("float", "tensor"):
            for what in ("train_step", "opt.step"):
                if not fused or (lr_kind, what) == ("tensor", "train_step"):
                    out.append(pytest.param(info, fused, lr_kind, what, id=f"{p.id}-{lr_kind}-lr-{what}"))
    return out


@pytest.mark.parametrize("info,fused,lr_kind,what", cases())
def test_compiled_step_follows_eager_and_does_not_recompile(info, fused, lr_kind, what):
    counter = CompileCounter()
    got, frames = run(info, fused, lr_kind, what, counter)
    expected, _ = run(info, fused, lr_kind)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert frames[1] == frames[-1], f"recompiled: frames compiled after each step {frames}"
    if what == "train_step":
        assert counter.op_count > 0              # the model's forward was compiled


def test_inductor_compiled_training_step_runs():
    """The same with the default backend (inductor generates the forward's code)."""
    from optforge.registry import get_optimizer_info

    info = get_optimizer_info("adamw")
    got, _ = run(info, False, "tensor", "train_step", "inductor")
    expected, _ = run(info, False, "tensor")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
