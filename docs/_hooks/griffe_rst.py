"""Griffe extension for mkdocstrings: optforge's reST docstrings -> Markdown before rendering
(math roles and blocks for arithmatex, cross-reference roles and literals as code)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import griffe

sys.path.insert(0, str(Path(__file__).parent))
from rst_markdown import rst_to_markdown  # noqa: E402


class RstToMarkdown(griffe.Extension):
    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
