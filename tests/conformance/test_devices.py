"""Every elementwise optimizer on a CUDA device: each path's trajectory there against the same
path on CPU, steady steps that never wait for the device, and checkpoints that move between
the two. Skipped where torch sees no CUDA device."""

import copy

import pytest
import torch
from conformance_cases import batch, make, make_model, mse, run, with_paths

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = "cuda"


def paths(fused_values=(False, None, True)):
    """(info, fused) of every elementwise optimizer's paths (``with_paths``) among ``fused_values``."""
    return [p for p in with_paths() if p.values[0].elementwise and p.values[1] in fused_values]


@pytest.mark.parametrize("info,fused", paths())
def test_trajectory_matches_cpu(info, fused):
    """float64: the device's kernels (torch's fused ones, foreach, the generated one compiled
    for the device) compute what the CPU's do, up to the rounding of another operation order."""
    cpu = make_model()
    dev = copy.deepcopy(cpu).to(DEVICE)
    a = run(cpu, make(info, cpu.parameters(), fused=fused), 12)
    b = run(dev, make(info, dev.parameters(), fused=fused), 12)
    assert (a[-1] - a[0]).abs().max() > 1e-4
    for step, (x, y) in enumerate(zip(a, b), start=1):
        torch.testing.assert_close(y, x, rtol=1e-9, atol=1e-11, msg=lambda m, step=step: f"step {step}: {m}")


@pytest.mark.parametrize("info,fused", paths((None, True)))
def test_steady_steps_never_wait_for_the_device(info, fused):
    """The default and fused steps queue their work and return: no host read of a device
    tensor, no copy from pageable memory (each would wait for the backward pass to finish)."""
    model = make_model(dtype=torch.float32).to(DEVICE)
    opt = make(info, model.parameters(), fused=fused)
    x, y = (t.to(DEVICE) for t in batch(dtype=torch.float32))
    for k in range(6):
        opt.zero_grad()
        mse(model, x, y).backward()
        if k < 3:                   # state, flat buffers, compilation
            opt.step()
            continue
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("info,fused", paths())
def test_checkpoint_moves_between_devices(info, fused):
    """A state_dict saved on the device resumes on CPU (and back) where the run left off."""
    dev = make_model().to(DEVICE)
    opt = make(info, dev.parameters(), fused=fused)
    run(dev, opt, 5)
    saved_model, saved_opt = copy.deepcopy(dev.state_dict()), copy.deepcopy(opt.state_dict())
    straight = run(dev, opt, 5)

    cpu = make_model()
    cpu.load_state_dict(saved_model)
    cpu_opt = make(info, cpu.parameters(), fused=fused)
    cpu_opt.load_state_dict(saved_opt)
    moved = run(cpu, cpu_opt, 5)
    for step, (x, y) in enumerate(zip(straight, moved), start=1):
        torch.testing.assert_close(y, x, rtol=1e-9, atol=1e-11, msg=lambda m, step=step: f"step {step}: {m}")

    back = make_model().to(DEVICE)
    back.load_state_dict(cpu.state_dict())
    back_opt = make(info, back.parameters(), fused=fused)
    back_opt.load_state_dict(cpu_opt.state_dict())
    for states in back_opt.state.values():
        for name, value in states.items():
            if torch.is_tensor(value) and value.dim() > 0:
                assert value.device.type == "cuda", name
    run(back, back_opt, 2)
