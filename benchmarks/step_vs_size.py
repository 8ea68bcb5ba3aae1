"""Step time against parameter count: the transformer layout of step_speed.py's many-small
workload (25 blocks, 300 tensors, ff = 4 d) at widths from 8 to 384, for a few optimizers on
each path, with torch's AdamW (foreach and fused) as the reference.

    python benchmarks/step_vs_size.py [--widths 8,32,128,256] [--rounds 5] [--json F] [--plot F]

Entries run interleaved in rounds at each width (medians); the table gives milliseconds and the
ratio to torch's fused AdamW at the same width, and ``--plot`` draws step time against
parameter count on log-log axes (docs/benchmarks/step_vs_size.png).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_speed import interleaved_medians, loadavg, transformer_shapes, versions  # noqa: E402

import optforge  # noqa: E402

WIDTHS = (8, 16, 32, 64, 128, 256, 384)
BASE = "torch AdamW fused"

# name -> constructor; eager is fused=False, "default" is what fused=None picks
ENTRIES: dict[str, Callable[[list[torch.Tensor]], Any]] = {
    "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
    BASE: lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
    "optforge AdamW default": lambda ps: optforge.AdamW(ps, lr=1e-3),
    "optforge AdamW eager": lambda ps: optforge.AdamW(ps, lr=1e-3, fused=False),
    "optforge Lion default (eager)": lambda ps: optforge.Lion(ps, lr=1e-4),
    "optforge Lion fused=True": lambda ps: optforge.Lion(ps, lr=1e-4, fused=True),
    "optforge Adan default (eager)": lambda ps: optforge.Adan(ps, lr=1e-3),
    "optforge Adan fused=True": lambda ps: optforge.Adan(ps, lr=1e-3, fused=True),
}


def build(width: int, make: Callable[[list[torch.Tensor]], Any], seed: int = 0) -> Any:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in transformer_shapes(width, 4 * width):
        p = torch.nn.Parameter(torch.randn(shape, generator=gen))
        p.grad = torch.randn(shape, generator=gen) * 1e-3
        params.append(p)
    opt = make(params)
    for _ in range(3):  # state, compile, first-step branches
        opt.step()
    return opt


def run(widths: list[int], rounds: int, steps: int) -> dict[str, Any]:
    rows = []
    for width in widths:
        n = sum(math.prod(s) for s in transformer_shapes(width, 4 * width))
        opts = {name: build(width, make) for name, make in ENTRIES.items()}
        med = interleaved_medians(opts, rounds, steps)
        rows.append({"width": width, "params": n, "ms": {k: v * 1e3 for k, v in med.items()}})
        del opts
        base = med[BASE]
        print(f"d={width:4d} params={n:>11,d}  " + "  ".join(
            f"{k}: {v * 1e3:.3g} ms ({v / base:.2f}x)" for k, v in med.items()), flush=True)
    return {"rows": rows, "threads": torch.get_num_threads(), "loadavg": loadavg(),
            "versions": versions()}


def print_table(result: dict[str, Any]) -> None:
    """Markdown: one row per entry, one column per width: ms (x torch's fused AdamW)."""
    rows = result["rows"]
    print("\n| entry | " + " | ".join(f"{r['params']:,d}" for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for name in ENTRIES:
        print(f"| {name} | " + " | ".join(
            f"{r['ms'][name]:.3g} ms ({r['ms'][name] / r['ms'][BASE]:.2f}x)" for r in rows) + " |")


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    xs = [r["params"] for r in result["rows"]]
    for name in ENTRIES:
        style = "--" if name.startswith("torch") else "-"
        ax.plot(xs, [r["ms"][name] for r in result["rows"]], style, marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (300 tensors: 25 transformer blocks of width d)")
    ax.set_ylabel("step time, ms (median)")
    ax.set_title(f"opt.step() on CPU, float32, {result['threads']} threads")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default=",".join(map(str, WIDTHS)), help="comma list of d")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps-per-round", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write the numbers here")
    ap.add_argument("--plot", type=Path, help="draw the figure here (PNG)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    widths = [int(w) for w in args.widths.split(",")]
    if any(w < 1 for w in widths):
        ap.error(f"--widths must be positive integers, got {args.widths!r}")
    result = run(widths, args.rounds, args.steps_per_round)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(result, args.plot)
    print(f"load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
