"""MkDocs hook: pages generated at build time from the optimizer registry and the README.

- ``index.md``: the README (links into docs/ made relative to the site).
- ``optimizers/index.md`` and one ``optimizers/<name>.md`` per registered optimizer
  (``optforge.list_optimizers(with_info=True)`` when the build runs, so an optimizer that is
  registered is documented): its docstring with the math rendered, a hyperparameter table,
  the papers cited in the docstring, when to use it, the state memory per parameter measured
  by one step on a (64, 32) float32 matrix, the parity tests that name it, and its gallery lrs.
- the nav's "Optimizers" section lists the generated pages.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File

sys.path.insert(0, str(Path(__file__).parent))
from rst_markdown import rst_to_markdown  # noqa: E402
from when_to_use import when_to_use  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PARITY_DIR = ROOT / "tests" / "parity"
GALLERY_SUMMARY = ROOT / "docs" / "gallery" / "summary.json"
OPTIMIZERS_SECTION = "Optimizers"

_pages: dict[str, str] = {}


def _infos() -> list[Any]:
    import optforge

    return optforge.list_optimizers(with_info=True)


# ---- nav and files ------------------------------------------------------------------------
def on_config(config: Any, **kwargs: Any) -> Any:
    entries = [{info.cls.__name__: f"optimizers/{info.name}.md"} for info in _infos()]
    for item in config["nav"] or []:
        if isinstance(item, dict) and OPTIMIZERS_SECTION in item:
            item[OPTIMIZERS_SECTION] = ["optimizers/index.md", *entries]
    return config


def on_files(files: Any, config: Any, **kwargs: Any) -> Any:
    _pages.clear()
    _pages["index.md"] = readme_page()
    infos = _infos()
    _pages["optimizers/index.md"] = optimizers_index(infos)
    for info in infos:
        _pages[f"optimizers/{info.name}.md"] = optimizer_page(info, infos)
    for uri, content in _pages.items():
        files.append(File.generated(config, uri, content=content))
    return files


# ---- README ---------------------------------------------------------------------------------
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


def readme_page() -> str:
    text = (ROOT / "README.md").read_text()

    def fix(m: re.Match) -> str:
        label, target = m.group(1), m.group(2)
        if target.startswith(("http://", "https://", "#")):
            return m.group(0)
        if target.startswith("docs/"):
            return f"[{label}]({target[len('docs/'):]})"
        return label                         # a repository file the site does not hold
    body = _LINK.sub(fix, text)
    return (body + "\n\nSee also: [write your own optimizer](tutorial.md), "
            "[the optimizers](optimizers/index.md).\n")


# ---- optimizer pages ------------------------------------------------------------------------
def _class_link(infos: list[Any], here: str) -> Any:
    by_class = {info.cls.__name__: info.name for info in infos}

    def link(target: str) -> str | None:
        short = target.rsplit(".", 1)[-1]
        name = by_class.get(short)
        if name is None:
            return None
        return f"[`{short}`]({name}.md)" if here == "optimizers" else f"[`{short}`](optimizers/{name}.md)"
    return link


def optimizers_index(infos: list[Any]) -> str:
    rows = ["| optimizer | name | aliases | description | elementwise | state B/param |",
            "|---|---|---|---|---|---|"]
    for info in infos:
        mem = measure_state(info)
        mem_text = f"{mem['bytes_per_param']:.2f}" if mem["ok"] else "n/a"
        rows.append(f"| [{info.cls.__name__}]({info.name}.md) | `{info.name}` | "
                    f"{', '.join(f'`{a}`' for a in info.aliases) or '—'} | {_cell(info.description)} | "
                    f"{'yes' if info.elementwise else 'no'} | {mem_text} |")
    return ("# Optimizers\n\n"
            f"The {len(infos)} optimizers registered when this site was built "
            "(`optforge list` prints the same registry). Each page is generated from the registry "
            "and the class docstring: equations, hyperparameters, papers, when to use it, measured "
            "state memory and parity tests.\n\n"
            "*elementwise*: the update is elementwise (no per-tensor norm or matrix structure), so "
            "`fused=True` and FSDP2/DTensor parameters are supported (see [distributed](../distributed.md)). "
            "*state B/param*: optimizer state bytes per parameter after one step on a (64, 32) "
            "float32 matrix.\n\n" + "\n".join(rows) + "\n")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def optimizer_page(info: Any, infos: list[Any]) -> str:
    cls = info.cls
    doc = inspect.getdoc(cls) or "(no docstring)"
    parts = [f"# {cls.__name__}", ""]
    aliases = ", ".join(f"`{a}`" for a in info.aliases)
    parts.append(f"`optforge.{cls.__name__}` · registry name `{info.name}`"
                 + (f" · aliases {aliases}" if aliases else "")
                 + f" · {'elementwise' if info.elementwise else 'not elementwise (eager only)'}")
    parts += ["", f"> {info.description}", ""]
    parts += ["## Update rule", "", rst_to_markdown(doc, _class_link(infos, "optimizers")), ""]
    parts += ["## Hyperparameters", "", hyperparameter_table(info), ""]
    parts += ["```python", f"optforge.create_optimizer(model, \"{info.name}\", lr=...)   # or",
              f"optforge.{cls.__name__}{_signature(cls)}", "```", ""]
    parts += ["## Paper", "", papers(doc), ""]
    parts += ["## When to use it", "", when_to_use(info), ""]
    parts += ["## Speed paths", "", paths_text(info), ""]
    parts += ["## State memory", "", state_memory_text(info), ""]
    parts += ["## Parity status", "", parity_text(info), ""]
    gallery = gallery_text(info)
    if gallery:
        parts += ["## Trajectories", "", gallery, ""]
    return "\n".join(parts)


def paths_text(info: Any) -> str:
    """Which step each ``fused`` setting runs for this optimizer, read from the code that picks it."""
    import torch

    from optforge import eager_chunks
    from optforge.paths import native_by_default

    cls = info.cls
    link = "[Which path do I get](../benchmarks.md#which-path-do-i-get)"
    if "fused" not in inspect.signature(cls.__init__).parameters:
        return f"One path: the eager step (no `fused` option). See {link}."
    opt = cls([torch.zeros(2, 2, requires_grad=True)])
    native = native_by_default(opt, opt.param_groups[0], (torch.device("cpu"), torch.float32))
    fusable = cls.has_kernel() and info.elementwise
    chunked = eager_chunks.chunked_class(cls)
    eager = ("the eager foreach step (one `torch._foreach_*` kernel per line of the update)" if fusable
             else "the eager step")
    if chunked:
        eager += (f"; on CPU, buckets of more than {eager_chunks.CHUNK:,d} entries run it over "
                  "cache-sized chunks")
    lines = []
    if native:
        lines.append("- default (`fused=None`): torch's own fused kernel, one pass over memory, for "
                     "plain contiguous float32/float64 tensors on CPU or CUDA when the hyperparameters "
                     "allow it (the default ones do); otherwise " + eager.split(" (")[0] + ".")
    else:
        lines.append(f"- default (`fused=None`): {eager}.")
    lines.append(f"- `fused=False`: {eager}.")
    if native:
        lines.append("- `fused=True`: torch's own fused kernel where the hyperparameters allow it, "
                     "else one generated (`torch.compile`) kernel over flat buffers.")
    elif fusable:
        lines.append("- `fused=True`: one generated (`torch.compile`) kernel over flat buffers, "
                     "compiled at the first step; the parameters become views into them (on CPU, those of "
                     "2^20 entries or more keep their memory and get a kernel call each).")
    else:
        reason = getattr(cls, "no_fused_reason", None) or "the update is not elementwise"
        lines.append(f"- `fused=True`: refused with a `ValueError`: {reason}.")
    return "\n".join(lines) + f"\n\nSee {link} and the [step times](../benchmarks.md#step-time)."


def _signature(cls: type) -> str:
    sig = inspect.signature(cls.__init__)
    params = [p.replace(annotation=inspect.Parameter.empty) for n, p in sig.parameters.items() if n != "self"]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


def _constraint_text(check: Any) -> str:
    """The check's docstring (for a closure, its factory's, with the captured values filled in)."""
    doc = inspect.getdoc(check)
    captured: dict[str, Any] = {}
    if not doc:                                   # a closure from a factory: one_of(...), beta_tuple(n)
        import optforge.constraints as constraints

        factory = getattr(constraints, check.__qualname__.split(".")[0], None)
        doc = inspect.getdoc(factory) if factory else None
        captured = {k: c.cell_contents for k, c in zip(check.__code__.co_freevars, check.__closure__ or ())
                    if isinstance(c.cell_contents, (int, float, str, tuple, frozenset))}
    if not doc:                                   # an optimizer's own check without a docstring
        return f"checked by `{check.__qualname__}`"
    doc = doc.splitlines()[0]
    for k, v in list(captured.items()):
        if f"``{k}``" in doc:
            doc = doc.replace(f"``{k}``", repr(v))
            del captured[k]
    if doc == "One of the given values." and len(captured) == 1:
        (values,) = captured.values()
        doc, captured = "One of " + ", ".join(f"``{v!r}``" for v in values) + ".", {}
    if captured:
        doc += " (" + ", ".join(f"{k}={v!r}" for k, v in captured.items()) + ")"
    return _cell(rst_to_markdown(doc))


def hyperparameter_table(info: Any) -> str:
    checks = info.cls._constraints() if hasattr(info.cls, "_constraints") else {}
    rows = ["| hyperparameter | default | accepted values |", "|---|---|---|"]
    for name, default in info.defaults.items():
        check = checks.get(name)
        rows.append(f"| `{name}` | `{default!r}` | {_constraint_text(check) if check else ''} |")
    rows.append("")
    rows.append("Every optforge optimizer also takes the base options `skip_nonfinite`, `fp32_state` and "
                "`stochastic_rounding` (off; see [reliability](../reliability.md)), and "
                "`weight_decay_mode` = `\"coupled\"` (L2 added to the gradient), `\"decoupled\"` "
                "(parameters shrunk by lr·λ) or `\"absolute\"` (shrunk by λ).")
    return "\n".join(rows)


_AUTHOR = r"[A-Z][\w\-]+"
_AUTHORS = rf"{_AUTHOR}(?:(?:,| &| and|, and|, &) {_AUTHOR})*(?: et al\.)?"
_CITATION = re.compile(rf"\(({_AUTHORS}),?\s+(?:\"[^\"]+\",\s+)?(?:[A-Za-z]+\s+)?(\d{{4}})[^)]*\)", re.S)
_ARXIV = re.compile(r"arXiv:(\d{4}\.\d{4,5})")


def papers(doc: str) -> str:
    lines = []
    for m in _CITATION.finditer(doc):
        text = " ".join(m.group(0)[1:-1].split())
        if text not in lines:
            lines.append(text)
    arxiv = sorted(set(_ARXIV.findall(doc)))
    out = [f"- {rst_to_markdown(t)}" for t in lines]
    out += [f"- arXiv [{a}](https://arxiv.org/abs/{a})" for a in arxiv]
    return "\n".join(out) if out else "No paper describes it: the description above names the code it follows."


# ---- measured state memory --------------------------------------------------------------------
_memory_cache: dict[str, dict[str, Any]] = {}


def measure_state(info: Any) -> dict[str, Any]:
    """One step on a (64, 32) float32 matrix: state tensor bytes / parameter count."""
    if info.name in _memory_cache:
        return _memory_cache[info.name]
    import torch

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 32))
    result: dict[str, Any]
    try:
        opt = info.cls([p])
        if hasattr(opt, "train") and callable(opt.train):
            opt.train()

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = (p * p).sum()
            loss.backward()
            return loss
        opt.step(closure)
        tensors = {k: v for k, v in opt.state[p].items() if torch.is_tensor(v)}
        total = sum(v.numel() * v.element_size() for v in tensors.values())
        result = dict(ok=True, bytes_per_param=total / p.numel(),
                      tensors={k: (tuple(v.shape), str(v.dtype).replace("torch.", ""))
                               for k, v in tensors.items()})
    except Exception as e:   # noqa: BLE001 - the page says why
        result = dict(ok=False, reason=f"{type(e).__name__}: {e}".splitlines()[0][:200])
    _memory_cache[info.name] = result
    return result


def state_memory_text(info: Any) -> str:
    mem = measure_state(info)
    if not mem["ok"]:
        return f"Not measured: one step on a (64, 32) float32 matrix raised `{mem['reason']}`."
    rows = ["| state entry | shape | dtype |", "|---|---|---|"]
    rows += [f"| `{k}` | {shape} | {dtype} |" for k, (shape, dtype) in mem["tensors"].items()]
    return (f"**{mem['bytes_per_param']:.2f} bytes per parameter** (measured when this page was built: "
            "one step with the defaults on a (64, 32) float32 matrix; the state tensor bytes over "
            "2048 parameters, the 0-d `step` counter included).\n\n" + "\n".join(rows))


# ---- parity -----------------------------------------------------------------------------------
def parity_text(info: Any) -> str:
    """The parity test files that build this class (``of.Name(`` / ``optforge.Name``)."""
    name = re.escape(info.cls.__name__)
    uses = re.compile(rf"\b(?:of|optforge)\.{name}\b|from optforge[\w.]* import [^\n]*\b{name}\b")
    hits = []
    for path in sorted(PARITY_DIR.glob("test_*.py")):
        text = path.read_text()
        if uses.search(text):
            first = (_module_doc(text) or "").split("\n\n")[0]
            hits.append(f"- `tests/parity/{path.name}`: {' '.join(first.split())}")
    if not hits:
        return ("No float64 parity test builds this optimizer yet (`tests/parity/`). The conformance "
                "suite (`tests/conformance/`) still runs on it, as on every registered optimizer.")
    return ("Full float64 trajectories are compared with a reference in:\n\n"
            + "\n".join(hits) + "\n\nThe conformance suite (`tests/conformance/`) runs on it too.")


def _module_doc(text: str) -> str | None:
    m = re.match(r'\s*(?:[rR])?"""(.*?)"""', text, re.S)
    return rst_to_markdown(m.group(1)) if m else None


# ---- gallery ----------------------------------------------------------------------------------
def gallery_text(info: Any) -> str:
    if not GALLERY_SUMMARY.exists():
        return ""
    summary = json.loads(GALLERY_SUMMARY.read_text())
    if info.name in summary.get("skipped", {}):
        return f"Not drawn in the [gallery](../gallery.md): {summary['skipped'][info.name]}"
    rows = ["| function | tuned lr | f at start | f after the path |", "|---|---|---|---|"]
    for fname, entry in summary.get("functions", {}).items():
        path = entry["paths"].get(info.name)
        if path:
            rows.append(f"| [{fname}](../gallery.md#{fname}) | {path['lr']:.3g} | "
                        f"{path['start_value']:.4g} | {path['final_value']:.4g} |")
    if len(rows) == 2:
        return ""
    return (f"Paths in the [trajectory gallery](../gallery.md) ({summary['steps']} steps, lr chosen "
            "from a log grid per function):\n\n" + "\n".join(rows))
