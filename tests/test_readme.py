"""The README's Python examples run as written, and its custom optimizer behaves as its docstring says."""

import ast
import contextlib
import io
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_examples_run_and_print_what_they_say():
    """Blocks run in order in one namespace, as a reader pastes them into one session; a
    ``print(x)  # value`` line prints that value."""
    blocks = _python_blocks()
    assert len(blocks) >= 3
    namespace: dict = {"__name__": "readme"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)
    claims = re.findall(r"^print\(.*\)\s+# (\[.*\])$", "\n".join(blocks), flags=re.M)
    assert claims
    printed = [ast.literal_eval(line) for line in out.getvalue().splitlines() if line.startswith("[")]
    assert printed == [ast.literal_eval(c) for c in claims]


def test_set_up_is_two_commands():
    """A newcomer runs one command to install and compare on real data (defaults), one to test."""
    setup = README.read_text().split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)```", setup, flags=re.S)
    assert [c.strip().count("\n") for c in commands] == [0, 0]
    install, test = (c.strip() for c in commands)
    assert install == 'pip install -c constraints.txt -e ".[compare]" && optforge compare'
    assert test == 'pip install -q -c constraints.txt -e ".[test,compare]" && python -m pytest -q'
    assert re.search(r"5-10 minutes.*`python -m pytest -q tests/parity`", setup, flags=re.S)


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
