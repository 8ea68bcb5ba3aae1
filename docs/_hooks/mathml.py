"""MkDocs hook: the math is rendered at build time, to MathML, which browsers display
natively: the site needs no math script and nothing from the network.

``pymdownx.arithmatex`` (generic mode) keeps each formula's TeX intact through Markdown, in
``<span class="arithmatex">\\(...\\)</span>`` (inline) or ``<div class="arithmatex">\\[...\\]</div>``
(display); this hook replaces the TeX inside with ``latex2mathml``'s MathML. A formula it
cannot convert fails the build, naming the page and the formula.
"""

from __future__ import annotations

import html
import re
from typing import Any

from latex2mathml.converter import convert

_ARITHMATEX = re.compile(r'<(span|div) class="arithmatex">(.*?)</\1>', re.S)
_DELIMITERS = {"\\(": "\\)", "\\[": "\\]", "$$": "$$", "$": "$"}
_TEXT_ESCAPE = re.compile(r"\\([_%&#{}$])")     # \_ inside \text{...}: latex2mathml keeps the backslash


def tex_to_mathml(tex: str, display: bool) -> str:
    for left, right in _DELIMITERS.items():
        if tex.startswith(left) and tex.endswith(right) and len(tex) >= len(left) + len(right):
            tex = tex[len(left):len(tex) - len(right)]
            break
    # latex2mathml lays out align* (right / left columns) but not aligned, the same layout
    tex = tex.replace("\\begin{aligned}", "\\begin{align*}").replace("\\end{aligned}", "\\end{align*}")
    mathml = _TEXT_ESCAPE.sub(r"\1", convert(tex.strip(), display="block" if display else "inline"))
    leftover = re.search(r"<mi>(&|\\[^<]*)</mi>|linebreak=", mathml)
    if leftover:     # TeX the converter passed through as text: the reader would see it raw
        raise ValueError(f"unconverted TeX {leftover.group(0)!r}")
    return mathml


def on_page_content(content: str, page: Any, **kwargs: Any) -> str:
    def render(m: re.Match) -> str:
        tag, tex = m.group(1), html.unescape(m.group(2)).strip()
        try:
            mathml = tex_to_mathml(tex, display=tag == "div")
        except Exception as e:
            raise ValueError(f"{page.file.src_uri}: cannot render the formula {tex!r}: {e}") from e
        return f'<{tag} class="arithmatex">{mathml}</{tag}>'

    return _ARITHMATEX.sub(render, content)
