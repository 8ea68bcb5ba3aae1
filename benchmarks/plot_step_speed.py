"""Draw docs/benchmarks/step_speed.png: optforge's step time per optimizer as a ratio to torch's
AdamW(fused=True), one panel per workload, from the run recorded in step_speed_2026-12-06.json
(written by step_speed_report.py --compact).

    python benchmarks/plot_step_speed.py [--json FILE] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
WORKLOADS = ("many-small", "one-big", "many-tiny")


def optforge_ratios(run: dict) -> dict[str, dict[str, dict[str, float | None]]]:
    """{optimizer: {path: {workload: ratio to torch AdamW[fused] or None}}} for optforge entries."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for entry, row in run["step_time_ratio"].items():
        if not entry.startswith("optforge."):
            continue
        name, path = entry.removeprefix("optforge.").rstrip("]").split("[")
        out.setdefault(name, {})[path] = {w: (row[w] or {}).get("x_fused") for w in WORKLOADS}
    return out


def plot(run: dict, out: Path) -> None:
    ratios = optforge_ratios(run)
    names = sorted(ratios, reverse=True)            # alphabetical from the top
    fig, axes = plt.subplots(1, len(WORKLOADS), figsize=(12, 7.5), sharey=True)
    for ax, workload in zip(axes, WORKLOADS):
        for offset, path, color in ((0.27, "eager", "tab:blue"), (0.0, "default", "tab:green"),
                                    (-0.27, "fused", "tab:orange")):
            cells = [(i, ratios[n].get(path, {}).get(workload)) for i, n in enumerate(names)]
            cells = [(i, x) for i, x in cells if x is not None]
            if cells:
                ax.barh([i + offset for i, _ in cells], [x for _, x in cells], height=0.27, color=color,
                        label=f"optforge {path}" + (" (torch's kernel)" if path == "default" else ""))
        ax.axvline(1.0, color="black", lw=1, ls="--", label="torch AdamW(fused=True)")
        foreach = run["step_time_ratio"]["torch.AdamW[foreach]"][workload]["x_fused"]
        ax.axvline(foreach, color="gray", lw=1, ls=":", label="torch AdamW(foreach=True)")
        params = run["workloads"][workload]
        tensors = f"{params['tensors']} tensor" + ("s" if params["tensors"] > 1 else "")
        ax.set_title(f"{workload}: {tensors}, {params['params']:,} params", fontsize=10)
        ax.set_xscale("log")
        ax.grid(axis="x", which="both", alpha=0.3)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].set_ylim(-0.7, len(names) - 0.3)
    fig.supxlabel("step time / torch AdamW(fused=True) step time, log scale (lower is faster)", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=4, fontsize=9, bbox_to_anchor=(0.5, 0.955))
    fig.suptitle(f"Step time on CPU (float32, 2 threads), measured {run['measured']}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=HERE / "step_speed_2026-12-06.json")
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs" / "benchmarks" / "step_speed.png")
    args = parser.parse_args()
    plot(json.loads(args.json.read_text()), args.out)
    print(args.out)


if __name__ == "__main__":
    main()
