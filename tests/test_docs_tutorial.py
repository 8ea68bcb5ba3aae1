"""Every ```python block of the executed docs pages runs as written (in order, one namespace
per page, as a reader pastes a page into one session), so the docs cannot rot. README.md's
blocks run in test_readme.py; reliability.md's snippets are fragments (``...``), not run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from optforge import registry

DOCS = Path(__file__).resolve().parents[1] / "docs"
EXECUTED_PAGES = ["tutorial.md"]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)


@pytest.fixture
def clean_registry():
    """Pages register optimizers (the tutorial does): undo it, so other tests see the package's."""
    saved = dict(registry._REGISTRY), dict(registry._ALIASES)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved[0])
    registry._ALIASES.clear()
    registry._ALIASES.update(saved[1])


def test_tutorial_has_its_steps():
    blocks = python_blocks(DOCS / "tutorial.md")
    assert len(blocks) >= 15
    text = "\n".join(blocks)
    for needle in ("def update(self, group, p, g, s, t)", "def kernel(group, p, g, s, c)", "fused=True",
                   "def transform_grads", "def decay_lr", "of.register(", "rtol=1e-10", "closure"):
        assert needle in text, needle


@pytest.mark.parametrize("name", EXECUTED_PAGES)
def test_docs_page_runs(name: str, clean_registry):
    page = DOCS / name
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for i, block in enumerate(python_blocks(page)):
        try:
            exec(compile(block, f"{page}:block{i + 1}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{page.name}, python block {i + 1} failed:\n{block}") from e
