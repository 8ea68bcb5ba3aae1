"""What a comparison leaves behind: the terminal table, ``results.json`` and ``curves.png``.

Every number in the table is the mean ± standard deviation over the seeds of an optimizer
(sample std; the mean alone with one seed). A diverged run counts in the ``diverged`` column and is left
out of the means. ``steps to target`` averages the runs that reached the target and says how
many did (``340 (2/3)``).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .runner import RunResult

__all__ = ["SCHEMA_VERSION", "format_table", "summarize", "write_json", "write_plot"]

SCHEMA_VERSION = 1

_METRICS = ("final_test_acc", "final_test_loss", "final_train_loss", "steps_to_target",
            "step_time_ms", "opt_step_time_ms", "state_bytes_per_param")


def _stats(values: Sequence[float]) -> dict[str, float | int | None]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": statistics.fmean(vals), "std": std, "n": len(vals)}


def summarize(runs: Sequence[RunResult], order: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per optimizer (in ``order``): the lr, the seed count, the diverged count and the stats
    of each metric over its non-diverged runs."""
    out: dict[str, dict[str, Any]] = {}
    for name in order:
        mine = [r for r in runs if r.optimizer == name]
        if not mine:
            continue
        ok = [r for r in mine if not r.diverged]
        row: dict[str, Any] = {"lr": mine[0].lr, "runs": len(mine),
                               "diverged": len(mine) - len(ok)}
        for key in _METRICS:
            src = mine if key in ("step_time_ms", "opt_step_time_ms", "state_bytes_per_param") else ok
            row[key] = _stats([getattr(r, key) for r in src])
        out[name] = row
    return out


def _pm(s: dict[str, Any], fmt: str, std_fmt: str | None = None) -> str:
    if s["mean"] is None:
        return "-"
    if s["n"] == 1:
        return f"{s['mean']:{fmt}}"
    return f"{s['mean']:{fmt}} ± {s['std']:{std_fmt or fmt}}"


def format_table(summary: dict[str, dict[str, Any]], *, classification: bool,
                 target_loss: float | None, tuned: dict[str, Any] | None = None) -> str:
    """The comparison as aligned text, one row per optimizer, best test metric first."""
    def sort_key(item):
        row = item[1]
        m = row["final_test_acc" if classification else "final_test_loss"]["mean"]
        if m is None:
            return (1, 0.0)
        return (0, -m if classification else m)

    head = ["optimizer", "lr"]
    if classification:
        head.append("test acc %")
    head += ["test loss", "train loss"]
    if target_loss is not None:
        head.append(f"steps to loss<={target_loss:g}")
    head += ["ms/step", "opt ms/step", "state B/param", "diverged"]
    rows = [head]
    for name, row in sorted(summary.items(), key=sort_key):
        lr = f"{row['lr']:.3g}" + (" (tuned)" if tuned and name in tuned else "")
        cells = [name, lr]
        if classification:
            cells.append(_pm(row["final_test_acc"], ".2f"))
        cells += [_pm(row["final_test_loss"], ".3g", ".2g"), _pm(row["final_train_loss"], ".3g", ".2g")]
        if target_loss is not None:
            s = row["steps_to_target"]
            reach = "-" if s["mean"] is None else f"{s['mean']:.0f}"
            if s["n"] < row["runs"]:
                reach += f" ({s['n']}/{row['runs']})"
            cells.append(reach)
        cells += [f"{row['step_time_ms']['mean']:.3f}", f"{row['opt_step_time_ms']['mean']:.3f}",
                  f"{row['state_bytes_per_param']['mean']:.2f}", f"{row['diverged']}/{row['runs']}"]
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _finite(obj: Any) -> Any:
    """JSON has no NaN/Infinity: non-finite floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` atomically (a temporary file, then a rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_finite(payload), f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def _band(curves: list[dict[str, list]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps shared by all curves, and the mean, min and max over the curves at each step."""
    if not curves:
        return [], [], [], []
    n = min(len(c["step"]) for c in curves)       # a diverged run stops early
    steps = curves[0]["step"][:n]
    mean, lo, hi = [], [], []
    for i in range(n):
        vals = [c["value"][i] for c in curves]
        vals = [v for v in vals if v is not None and math.isfinite(v)]
        mean.append(statistics.fmean(vals) if vals else math.nan)
        lo.append(min(vals, default=math.nan))
        hi.append(max(vals, default=math.nan))
    return steps, mean, lo, hi


def write_plot(path: Path, runs: Sequence[RunResult], order: Sequence[str], *, title: str,
               classification: bool) -> None:
    """``curves.png``: train loss (log scale) and test accuracy (or test loss) against step;
    one colour per optimizer, the line the mean over seeds, the band their range (min to max:
    unlike mean ± std it stays positive on a log axis)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_test = fig.subplots(1, 2)
    colours = [f"C{i}" for i in range(10)]
    for i, name in enumerate(order):
        mine = [r for r in runs if r.optimizer == name]
        if not mine:
            continue
        colour, style = colours[i % 10], ("-" if i < 10 else "--")
        label = f"{name} (lr {mine[0].lr:.3g})"
        for ax, curves in ((ax_loss, [r.train_loss for r in mine]),
                           (ax_test, [r.test_acc if classification else r.test_loss for r in mine])):
            steps, mean, lo, hi = _band([c for c in curves if c is not None])
            if not steps:
                continue
            ax.plot(steps, mean, style, color=colour, label=label, lw=1.5)
            if len(mine) > 1:
                ax.fill_between(steps, lo, hi, color=colour, alpha=0.2, lw=0)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("train loss (window mean)")
    ax_test.set_xlabel("step")
    if classification:
        ax_test.set_ylabel("test accuracy %")
        # zoom on the second half of training, where optimizers differ; early points clip
        late = [v for r in runs if r.test_acc for v in r.test_acc["value"][len(r.test_acc["value"]) // 2:]
                if v is not None and math.isfinite(v)]
        ax_test.set_ylim(max(0.0, min(late, default=0.0) - 5), min(100.0, max(late, default=100.0) + 2))
    else:
        ax_test.set_ylabel("test loss")
        ax_test.set_yscale("log")
    for ax in (ax_loss, ax_test):
        ax.grid(True, alpha=0.3)
    ax_test.legend(fontsize=8, loc="lower right" if classification else "upper right")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
