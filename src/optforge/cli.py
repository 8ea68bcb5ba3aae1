"""The ``optforge`` command: ``optforge list``, ``optforge compare`` and ``optforge visualize``."""

from __future__ import annotations

import argparse
import sys


def _format_defaults(defaults: dict) -> str:
    skip = {"maximize"}
    return ", ".join(f"{k}={v}" for k, v in defaults.items() if k not in skip)


def cmd_list(args: argparse.Namespace) -> int:
    from .registry import list_optimizers

    infos = list_optimizers(args.filter, with_info=True)
    if not infos:
        print(f"no optimizer matches {args.filter!r}", file=sys.stderr)
        return 2
    rows = [(i.name, ", ".join(i.aliases), i.description, _format_defaults(i.defaults)) for i in infos]
    head = ("name", "aliases", "description", "defaults")
    widths = [max(len(r[c]) for r in [head, *rows]) for c in range(3)]
    for r in [head, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(r[:3], widths)) + "  " + r[3])
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import visualize
    from .compare import cli as compare_cli

    parser = argparse.ArgumentParser(prog="optforge",
                                     description="PyTorch optimizers: list, compare and visualize.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="print the optimizer registry as a table")
    p_list.add_argument("filter", nargs="?", default="*", help="wildcard on names/aliases, e.g. 'adam*'")
    p_list.set_defaults(func=cmd_list)
    p_cmp = sub.add_parser("compare", help="train small models on real data with several optimizers",
                           description=compare_cli.__doc__)
    compare_cli.add_arguments(p_cmp)
    p_cmp.set_defaults(func=compare_cli.run)
    p_viz = sub.add_parser("visualize", help="draw each optimizer's path on 2-D test functions (PNGs)",
                           description=visualize.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    visualize.add_arguments(p_viz)
    p_viz.set_defaults(func=visualize.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv                      # the command line, for compare's provenance
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
