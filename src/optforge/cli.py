"""The ``optforge`` command (also ``python -m optforge``): ``list``, ``compare`` and ``visualize``."""

from __future__ import annotations

import argparse
import itertools
import re
import sys
import textwrap

TABLE_WIDTH = 100   # the table fits a 100-column terminal; `optforge list NAME` has the details


def _wrap(words: list[str], width: int) -> list[str]:
    lines: list[str] = []
    for w in words:
        if lines and len(lines[-1]) + 2 + len(w) <= width:
            lines[-1] += ", " + w
        else:
            lines.append(w)
    return [line + "," for line in lines[:-1]] + lines[-1:] or [""]


def _table(infos: list) -> list[str]:
    """name, aliases, description; long aliases and descriptions wrap onto more lines."""
    name_w = max(len(i.name) for i in infos)
    alias_w = max([len("aliases"), *(len(a) + 1 for i in infos for a in i.aliases)])
    room = TABLE_WIDTH - name_w - alias_w - 4
    out = [f"{'name'.ljust(name_w)}  {'aliases'.ljust(alias_w)}  description"]
    for i in infos:
        cells = itertools.zip_longest([i.name], _wrap(list(i.aliases), alias_w),
                                      textwrap.wrap(i.description, room), fillvalue="")
        out += [f"{a.ljust(name_w)}  {b.ljust(alias_w)}  {c}".rstrip() for a, b, c in cells]
    return out


def _details(info) -> list[str]:
    aliases = f"  (aliases: {', '.join(info.aliases)})" if info.aliases else ""
    fused = "fused=True available" if getattr(info.cls, "has_kernel", lambda: False)() else "no fused=True"
    lines = [f"{info.name}{aliases}", f"  {info.description}",
             f"  class: {info.cls.__module__.split('.')[0]}.{info.cls.__name__}",
             f"  update: {'elementwise' if info.elementwise else 'needs whole tensors'}; {fused}",
             "  defaults:"]
    lines += [f"    {k} = {v!r}" for k, v in info.defaults.items()]
    return lines


def cmd_list(args: argparse.Namespace) -> int:
    from .registry import list_optimizers

    infos = list_optimizers(args.filter, with_info=True)
    if not infos:
        print(f"no optimizer matches {args.filter!r}", file=sys.stderr)
        return 2
    one_name = len(infos) == 1 and not any(ch in args.filter for ch in "*?[")
    if getattr(args, "long", False) or one_name:
        print("\n\n".join("\n".join(_details(i)) for i in infos))
    else:
        print("\n".join(_table(infos)))
        print(f"\n{len(infos)} optimizers; `optforge list NAME` (or --long) shows one's defaults")
    return 0


def plain(doc: str | None) -> str:
    """A docstring as terminal text: ``code`` and :role:`target` markup dropped."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", doc or "")
    return text.replace("``", "")


def build_parser() -> argparse.ArgumentParser:
    from . import visualize
    from .compare import cli as compare_cli

    parser = argparse.ArgumentParser(prog="optforge",
                                     description="PyTorch optimizers: list, compare and visualize.")
    parser.add_argument("--version", action="version", version=f"optforge {_version()}")
    sub = parser.add_subparsers(dest="command")
    p_list = sub.add_parser("list", help="print the optimizer registry as a table")
    p_list.add_argument("filter", nargs="?", default="*",
                        help="a name or alias (shows its details), or a wildcard, e.g. 'adam*'")
    p_list.add_argument("--long", action="store_true", help="details (defaults) of every match")
    p_list.set_defaults(func=cmd_list)
    p_cmp = sub.add_parser("compare", help="train small models on real data with several optimizers",
                           description=plain(compare_cli.__doc__))
    compare_cli.add_arguments(p_cmp)
    p_cmp.set_defaults(func=compare_cli.run)
    p_viz = sub.add_parser("visualize", help="draw each optimizer's path on 2-D test functions (PNGs)",
                           description=plain(visualize.__doc__),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    visualize.add_arguments(p_viz)
    p_viz.set_defaults(func=visualize.run)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("optforge")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _attach_negative_values(argv: list[str]) -> list[str]:
    """``--lr -1e-3`` -> ``--lr=-1e-3``: argparse would read a negative number in exponent
    notation as an option, and say "expected one argument" instead of what is wrong with it."""
    out: list[str] = []
    for token in argv:
        if (out and out[-1].startswith("--") and "=" not in out[-1] and token.startswith("-")
                and _is_number(token)):
            out[-1] += "=" + token
        else:
            out.append(token)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(_attach_negative_values(argv))
    if args.command is None:        # plain `optforge`: say what it can do
        parser.print_help()
        return 0
    args.argv = argv                      # the command line, for compare's provenance
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
