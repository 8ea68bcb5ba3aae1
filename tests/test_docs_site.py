"""The documentation site builds with `mkdocs build --strict` (no broken link, missing reference
or docstring warning), with a page per registered optimizer."""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
import sys
from html import unescape
from pathlib import Path

import pytest

pytest.importorskip("mkdocs")
pytest.importorskip("material")
pytest.importorskip("mkdocstrings_handlers.python")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**_env(), "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    yield out
    shutil.rmtree(out, ignore_errors=True)


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def test_every_registered_optimizer_has_a_page(site):
    import optforge

    for info in optforge.list_optimizers(with_info=True):
        page = site / "optimizers" / info.name / "index.html"
        assert page.exists(), info.name
        html = page.read_text()
        for section in ("Update rule", "Hyperparameters", "Paper", "When to use it", "Speed paths",
                        "State memory", "Parity status"):
            assert section in html, (info.name, section)
        assert "bytes per parameter" in html or "Not measured" in html
    index = (site / "optimizers" / "index.html").read_text()
    assert all(f"{i.name}/" in index for i in optforge.list_optimizers(with_info=True))


def test_math_is_rendered_not_raw_rest(site):
    html = (site / "optimizers" / "adam" / "index.html").read_text()
    assert ".. math::" not in html and ":math:" not in html and ":class:" not in html
    api = (site / "api" / "index.html").read_text()
    assert "optforge.create_optimizer" in api and "TensorList" in api
    assert ":class:" not in api and ".. math::" not in api


def test_pages_and_images_are_there(site):
    for page in ("tutorial", "integrations", "gallery", "compare", "compare_schema", "benchmarks",
                 "reliability", "distributed", "api"):
        assert (site / page / "index.html").exists(), page
    for image in ("gallery/rosenbrock.png", "gallery/rastrigin.png", "gallery/saddle.png",
                  "compare/digits_curves.png", "compare/tuned_digits_curves.png",
                  "compare/text_curves.png", "compare/mnist1d_curves.png", "benchmarks/step_speed.png"):
        assert (site / image).read_bytes().startswith(b"\x89PNG"), image
    home = (site / "index.html").read_text()
    assert "optforge" in home and 'href="reliability/"' in home


def _pages(site: Path) -> dict[str, str]:
    return {str(p.relative_to(site)): p.read_text() for p in site.rglob("*.html")}


def test_math_is_mathml_built_in_with_nothing_from_the_network(site):
    """Formulas are MathML in the page (browsers draw it), not TeX left for a script to typeset."""
    adam = (site / "optimizers" / "adam" / "index.html").read_text()
    blocks = re.findall(r'<div class="arithmatex">(.*?)</div>', adam, re.S)
    assert blocks and all(b.startswith('<math xmlns="http://www.w3.org/1998/Math/MathML" display="block">')
                          for b in blocks)
    assert "<mtable" in adam and "<msub><mi>m</mi><mi>t</mi></msub>" in adam    # aligned, m_t
    for name, html in _pages(site).items():
        for math in re.findall(r'class="arithmatex">(.*?)</(?:span|div)>', html, re.S):
            assert math.startswith("<math"), (name, math[:80])
        assert not re.search(r"(\\beta|\\frac|\\sqrt)\b", re.sub(r"<code.*?</code>|<pre.*?</pre>", "", html,
                                                                    flags=re.S)), name
        assert not re.search(r"<script[^>]+src=\"(https?:)?//", html), name          # no CDN
        assert "mathjax" not in html.lower() and "katex" not in html.lower(), name


# Words about how the project is made, not about the library: no user page may hold them.
INTERNAL = re.compile(r"\bissues?\b|\bsessions?\b|\bseed (files?|optimizers?|set)\b|\bthe seed's\b|"
                      r"\bseeds?/|\bseed \d{3}\b|"
                      r"(?<![\w.])/(work|home|root|tmp|mnt|Users)/", re.I)


def _text(html: str) -> str:
    html = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", html, flags=re.S)
    # a line of a code block ends there: "every seed" + a table's "optimizer" is no phrase
    html = re.sub(r"<pre.*?</pre>", lambda m: m.group(0).replace("\n", " ¶ "), html, flags=re.S)
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", html)).split())


def test_no_user_page_speaks_of_how_the_project_is_made(site):
    pages = {name: _text(html) for name, html in _pages(site).items()}
    sources = [ROOT / "README.md", *ROOT.glob("docs/*.md")]
    pages.update({str(p.relative_to(ROOT)): p.read_text() for p in sources})
    found = {name: m.group(0) for name, text in pages.items() if (m := INTERNAL.search(text))}
    assert not found, found
    assert INTERNAL.search("see the issue") and INTERNAL.search("in /work/main/src")


def test_speed_paths_section_says_what_each_optimizer_runs():
    """Each page's "Speed paths" claims hold: torch's fused kernel runs by default exactly where
    the page says so, and fused=True is refused exactly where the page says so."""
    from contextlib import ExitStack
    from unittest import mock

    import torch

    import optforge

    sys.path.insert(0, str(ROOT / "docs" / "_hooks"))
    from optforge_docs import paths_text

    kernels = ("_fused_adam_", "_fused_adamw_", "_fused_sgd_", "_fused_adagrad_")
    for info in optforge.list_optimizers(with_info=True):
        text = paths_text(info)
        if "fused" not in inspect.signature(info.cls.__init__).parameters:
            assert text.startswith("One path"), info.name
            continue
        default_line, = (line for line in text.splitlines() if line.startswith("- default"))
        p = torch.nn.Parameter(torch.randn(6, 5))
        p.grad = torch.randn(6, 5)
        opt = info.cls([p])
        with ExitStack() as stack:
            spies = [stack.enter_context(mock.patch.object(torch, k, wraps=getattr(torch, k)))
                     for k in kernels]
            opt.step()
        ran_native = sum(s.call_count for s in spies) > 0
        assert ran_native == ("torch's own fused kernel" in default_line), info.name
        p.grad = torch.randn(6, 5)
        try:
            info.cls([p], fused=True).step()
            refused = False
        except ValueError:
            refused = True
        assert refused == ("refused" in text), info.name
