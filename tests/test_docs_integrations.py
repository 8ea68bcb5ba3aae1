"""docs/integrations.md runs as written: each section's python blocks in order, in one fresh
namespace (as a reader pastes a section into one session), in a temporary folder. A section
whose framework is not installed is skipped (the frameworks are in the ``test`` extra)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

PAGE = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
FRAMEWORK = {"Hugging Face Trainer": "transformers", "PyTorch Lightning": "lightning",
             "Hugging Face Accelerate": "accelerate", "Plain PyTorch": None}


def sections() -> dict[str, list[str]]:
    """``## heading`` -> the python blocks under it (its ``###`` subsections included)."""
    parts = re.split(r"^## (.+)$", PAGE.read_text(), flags=re.M)
    return {title.strip(): re.findall(r"^```python\n(.*?)^```", body, flags=re.S | re.M)
            for title, body in zip(parts[1::2], parts[2::2])}


def test_every_section_is_run():
    found = sections()
    assert set(found) == set(FRAMEWORK)
    assert all(found.values())


@pytest.mark.parametrize("title", list(FRAMEWORK))
def test_section_runs(title, tmp_path, monkeypatch):
    if FRAMEWORK[title]:
        pytest.importorskip(FRAMEWORK[title])
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    namespace: dict = {"__name__": f"docs_integrations_{FRAMEWORK[title]}"}
    try:
        for i, block in enumerate(sections()[title]):
            try:
                exec(compile(block, f"{PAGE}:{title}:block{i + 1}", "exec"), namespace)
            except Exception as e:
                raise AssertionError(f"{title}, python block {i + 1} failed:\n{block}") from e
    finally:
        torch.set_num_threads(threads)
