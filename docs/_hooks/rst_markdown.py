"""reST docstrings -> Markdown for the docs site (pymdownx.arithmatex renders the math).

Handles what optforge's docstrings use: ``.. math::`` blocks (``aligned`` when they use ``&``
or ``\\``), ``:math:`...``` roles, ``:class:``/``:func:``/``:meth:``/``:mod:``/``:attr:``
roles, double-backtick literals, ``::`` literal blocks, and lists that follow a paragraph
without a blank line. Math is protected first, so literals inside it stay LaTeX.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_ROLE = re.compile(r":(?:class|func|meth|mod|attr|obj|data|exc|py:\w+):`~?([^`]+)`")
_INLINE_MATH = re.compile(r":math:`([^`]+)`", re.S)
_LITERAL = re.compile(r"``(.+?)``", re.S)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _take_block(lines: list[str], i: int, base: int) -> tuple[list[str], int]:
    """The lines indented deeper than ``base`` from ``i`` on (blank lines inside kept)."""
    block: list[str] = []
    while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
        block.append(lines[i])
        i += 1
    while block and not block[-1].strip():
        block.pop()
        i -= 1
    return block, i


def _dedent(block: list[str]) -> list[str]:
    width = min((_indent(x) for x in block if x.strip()), default=0)
    return [x[width:] for x in block]


def _display_math(body: list[str]) -> str:
    tex = "\n".join(x.rstrip() for x in _dedent(body) if x.strip())
    tex = _LITERAL.sub(lambda m: m.group(1), tex)   # ``name`` inside \text{}: MathJax shows text as is
    if "&" in tex or "\\\\" in tex:
        tex = "\\begin{aligned}\n" + tex + "\n\\end{aligned}"
    return "$$\n" + tex + "\n$$"


def rst_to_markdown(text: str, role_link: Callable[[str], str | None] | None = None) -> str:
    """Convert a (dedented) docstring. ``role_link(target)`` may return a Markdown link for a
    ``:class:`` etc. target; otherwise the target is shown as code."""
    saved: list[str] = []

    def keep(s: str) -> str:
        saved.append(s)
        return f"\x00{len(saved) - 1}\x00"

    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith(".. math::"):
            first = stripped[len(".. math::"):].strip()
            body, i = _take_block(lines, i + 1, _indent(line))
            out += ["", keep(_display_math(([first] if first else []) + body)), ""]
            continue
        if stripped.endswith("::") and i + 1 < len(lines):
            body, j = _take_block(lines, i + 1, _indent(line))
            if any(x.strip() for x in body):
                head = line.rstrip()[:-1]          # "Example::" -> "Example:"; "::" alone -> ":"
                if head.strip() != ":":
                    out.append(head)
                code = "\n".join(_dedent([x for x in body]))
                out += ["", keep("```python\n" + code.strip("\n") + "\n```"), ""]
                i = j
                continue
        out.append(line)
        i += 1
    text = "\n".join(out)
    text = _INLINE_MATH.sub(lambda m: keep("$" + " ".join(m.group(1).split()) + "$"), text)

    def role(m: re.Match) -> str:
        target = m.group(1)
        link = role_link(target) if role_link else None
        return keep(link or f"`{target}`")

    text = _ROLE.sub(role, text)
    text = _LITERAL.sub(lambda m: keep("`" + " ".join(m.group(1).split()) + "`"), text)
    text = _blank_before_lists(text)
    for _ in range(3):                              # placeholders may nest (a role in a list)
        text = re.sub(r"\x00(\d+)\x00", lambda m: saved[int(m.group(1))], text)
    return text


def _blank_before_lists(text: str) -> str:
    lines = text.splitlines()
    out: list[str] = []
    for k, line in enumerate(lines):
        is_item = re.match(r"\s*(?:[-*]|\d+\.)\s", line) is not None
        prev = lines[k - 1] if k else ""
        prev_is_item_or_cont = out and (re.match(r"\s*(?:[-*]|\d+\.)\s", prev) or prev.startswith("  "))
        if is_item and prev.strip() and not prev_is_item_or_cont:
            out.append("")
        out.append(line)
    return "\n".join(out)
