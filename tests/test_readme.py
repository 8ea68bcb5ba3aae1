"""The README's Python examples run as written, and its custom optimizer behaves as its docstring says."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_examples_run():
    """Blocks run in order in one namespace, as a reader pastes them into one session."""
    blocks = _python_blocks()
    assert len(blocks) >= 3
    namespace: dict = {"__name__": "readme"}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)


def test_readme_custom_optimizer_follows_its_equations():
    namespace: dict = {"__name__": "readme"}
    (block,) = [b for b in _python_blocks() if "class SignMomentum" in b]
    exec(compile(block, str(README), "exec"), namespace)
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    opt = namespace["SignMomentum"]([p], lr=0.1, betas=(0.5,))
    m = torch.zeros(3, dtype=torch.float64)
    expected = p.detach().clone()
    for g in ([1.0, -1.0, 2.0], [-3.0, 0.5, 1.0], [0.5, 0.5, -4.0]):
        g = torch.tensor(g, dtype=torch.float64)
        p.grad = g.clone()
        opt.step()
        m = 0.5 * m + 0.5 * g
        expected -= 0.1 * torch.sign(m)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-15)
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)  # the user's gradient is untouched
