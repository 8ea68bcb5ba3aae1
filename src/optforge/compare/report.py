"""What a comparison leaves behind: the summary with its intervals, the terminal table,
``results.json`` and ``curves.png``; and ``--report``, which merges saved runs.

Per optimizer, the test metric is the mean over its seeds and test examples with a 95 %
bootstrap interval over both (:mod:`.stats`); ``vs baseline`` is the paired difference
(same seed, same test example) with its interval, marked ``≈`` when the interval contains 0:
indistinguishable from the baseline. ``rank`` is the range of places the paired intervals
support (``1-3``: better than none beyond doubt, worse than three beyond doubt in a table of
six). A diverged run is counted and left out of the statistics.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .stats import LEVEL, N_BOOT, Replicates, interval, rank_ranges

__all__ = ["SCHEMA_VERSION", "format_table", "merge", "self_scheduling", "summarize", "write_json",
           "write_plot"]

SCHEMA_VERSION = 2


def self_scheduling(name: str, resolved: dict[str, Any]) -> str | None:
    """Why ``name`` (with its resolved hyperparameters) changes its own step size over time,
    or None: such an optimizer's schedule acts on top of ``--schedule``."""
    base = name.removeprefix("lookahead_")
    if base == "noam":
        return "its own warmup and 1/sqrt(t) decay (Noam)"
    if base == "adam_warmup" and resolved.get("warmup", 0):
        return f"its own linear warmup ({resolved['warmup']} steps)"
    if base.startswith("schedule_free"):
        return "Schedule-Free: iterate averaging in place of a decay"
    if base == "adafactor" and resolved.get("relative_step", False):
        return "relative step: lr capped by 1/sqrt(t)"
    if base == "prodigy":
        return "learns its step size D"
    return None


def _test_matrix(runs: list[dict[str, Any]], seeds: Sequence[int]) -> np.ndarray:
    by_seed = {r["seed"]: r["test_values"] for r in runs}
    return np.array([by_seed[s] for s in seeds], dtype=np.float64)


def _mean_of(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(vals) if vals else None


def _median_of(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else None


def resolution(runs: list[dict[str, Any]], per_example: float | None) -> float | None:
    """How much one test example moves the metric, for a metric with a fixed step per example."""
    n = next((len(r["test_values"]) for r in runs if r.get("test_values")), 0)
    return per_example / n if per_example and n else None


def summarize(runs: list[dict[str, Any]], order: Sequence[str], *, baseline: str,
              higher_is_better: bool, resolution_per_example: float | None = None) -> dict[str, Any]:
    """Per optimizer (in ``order``): counts, hyperparameters, the test metric with its interval,
    the paired difference to ``baseline``, the supported rank range and the time columns;
    and the settings of the statistics (``statistics``)."""
    finals = [r for r in runs if r["split"] == "test"]
    ok = {n: [r for r in finals if r["optimizer"] == n and not r["diverged"]] for n in order}
    reps: dict[int, Replicates] = {}

    def replicates(n_seeds: int, n_examples: int) -> Replicates:
        if n_seeds not in reps:
            reps[n_seeds] = Replicates(n_seeds, n_examples)
        return reps[n_seeds]

    n_examples = next((len(r["test_values"]) for r in finals if r.get("test_values")), 0)
    rows: dict[str, Any] = {}
    for name in order:
        mine = [r for r in finals if r["optimizer"] == name]
        if not mine:
            continue
        good = ok[name]
        row: dict[str, Any] = {
            "runs": len(mine), "diverged": len(mine) - len(good),
            "seeds": [r["seed"] for r in mine],
            "hyperparameters": mine[0]["hyperparameters"],
            "self_scheduling": self_scheduling(name, mine[0].get("resolved", {})),
            "test_metric": None, "vs_baseline": None, "rank": None,
            "val_metric": _mean_of([r["final_val_metric"] for r in good]),
            "test_loss": _mean_of([r["final_test_loss"] for r in good]),
            "train_loss": _mean_of([r["final_train_loss"] for r in good]),
            "steps_to_target": _mean_of([r["steps_to_target"] for r in good]),
            "seconds_to_target": _mean_of([r["seconds_to_target"] for r in good]),
            "reached_target": sum(r["steps_to_target"] is not None for r in good),
            "first_step_s": _median_of([r["first_step_s"] for r in mine]),
            "step_time_ms": _median_of([r["step_time_ms"] for r in mine]),
            "opt_step_time_ms": _median_of([r["opt_step_time_ms"] for r in mine]),
            "state_bytes_per_param": _mean_of([r["state_bytes_per_param"] for r in mine]),
        }
        if good and n_examples:
            seeds = sorted(r["seed"] for r in good)
            m = _test_matrix(good, seeds)
            lo, hi = interval(replicates(len(seeds), n_examples).of(m))
            row["test_metric"] = {"mean": float(m.mean()), "low": lo, "high": hi, "n_seeds": len(seeds)}
        rows[name] = row
    matrices = {}
    for name in rows:
        if rows[name]["test_metric"] is not None:
            matrices[name] = {r["seed"]: r["test_values"] for r in ok[name]}
    if baseline in matrices:
        for name, by_seed in matrices.items():
            if name == baseline:
                continue
            seeds = sorted(set(by_seed) & set(matrices[baseline]))
            if not seeds:
                continue
            d = (np.array([by_seed[s] for s in seeds]) - np.array([matrices[baseline][s] for s in seeds]))
            lo, hi = interval(replicates(len(seeds), n_examples).of(d))
            rows[name]["vs_baseline"] = {"mean": float(d.mean()), "low": lo, "high": hi,
                                         "n_seeds": len(seeds), "indistinguishable": lo <= 0 <= hi}
    common = sorted(set.intersection(*(set(m) for m in matrices.values()))) if matrices else []
    if len(matrices) > 1 and common:
        full = {n: np.array([m[s] for s in common]) for n, m in matrices.items()}
        for name, (lo_rank, hi_rank) in rank_ranges(full, replicates(len(common), n_examples),
                                                    higher_is_better).items():
            rows[name]["rank"] = [lo_rank, hi_rank]
    return {"statistics": {"baseline": baseline, "level": LEVEL, "bootstrap_replicates": N_BOOT,
                           "n_test_examples": n_examples, "higher_is_better": higher_is_better,
                           "resolution": resolution(finals, resolution_per_example),
                           "rank_seeds": common},
            "optimizers": rows}


# ---- the table ---------------------------------------------------------------------------------
def _decimals(width: float | None, res: float | None) -> int:
    """Digits after the point: enough to show the resolution, else two significant digits of
    the interval's width."""
    step = res if res else width
    if not step or not math.isfinite(step) or step <= 0:
        return 3
    return max(0, 1 - math.floor(math.log10(step)))


def _fmt(v: float, d: int, signed: bool) -> str:
    """``v`` with ``d`` decimals; a non-zero value that would print as 0 keeps one significant
    digit, so an interval bound just off 0 does not read as 0."""
    sign = "+" if signed else ""
    if v != 0 and round(v, d) == 0:
        return f"{v:{sign}.1g}"
    return f"{v:{sign}.{d}f}"


def _ci(s: dict[str, Any] | None, d: int, signed: bool = False) -> str:
    if s is None:
        return "-"
    return f"{_fmt(s['mean'], d, signed)} [{_fmt(s['low'], d, signed)}, {_fmt(s['high'], d, signed)}]"


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_table(summary: dict[str, Any], *, metric: str, target: float | None, lr_label: str,
                 header: str) -> str:
    """The comparison as aligned text: a header, one row per optimizer (best test metric
    first), and the notes that explain its marks."""
    stats_, rows = summary["statistics"], summary["optimizers"]
    higher, res, base = stats_["higher_is_better"], stats_["resolution"], stats_["baseline"]
    widths = [r["test_metric"]["high"] - r["test_metric"]["low"] for r in rows.values() if r["test_metric"]]
    d = _decimals(min(widths) if widths else None, res)

    def order(item):
        t = item[1]["test_metric"]
        return (1, 0.0) if t is None else (0, -t["mean"] if higher else t["mean"])

    head = ["optimizer", "lr", f"test {metric} [95% CI]", f"vs {base} [95% CI]", "rank",
            f"val {metric}"]
    if target is not None:
        head += [f"steps to val {'>=' if higher else '<='} {target:g}", "s to target"]
    head += ["train loss", "ms/step", "1st step s", "state B/param", "diverged"]
    table = [head]
    flags = []
    for name, row in sorted(rows.items(), key=order):
        label = name + (" †" if row["self_scheduling"] else "")
        if row["self_scheduling"]:
            flags.append(f"{name}: {row['self_scheduling']}")
        vs = row["vs_baseline"]
        vs_cell = "(baseline)" if name == base else _ci(vs, d, signed=True) + (
            " ≈" if vs and vs["indistinguishable"] else "")
        rank = row["rank"]
        rank_cell = "-" if rank is None else str(rank[0]) if rank[0] == rank[1] else f"{rank[0]}-{rank[1]}"
        cells = [label, _num(row["hyperparameters"].get("lr"), ".3g"), _ci(row["test_metric"], d),
                 vs_cell, rank_cell, _num(row["val_metric"], f".{d}f")]
        if target is not None:
            n = row["runs"] - row["diverged"]
            reach = f" ({row['reached_target']}/{n})" if row["reached_target"] < n else ""
            cells += [_num(row["steps_to_target"], ".0f") + reach, _num(row["seconds_to_target"], ".2f")]
        cells += [_num(row["train_loss"], ".3g"), _num(row["step_time_ms"], ".3f"),
                  _num(row["first_step_s"], ".3f"), _num(row["state_bytes_per_param"], ".2f"),
                  f"{row['diverged']}/{row['runs']}"]
        table.append(cells)
    w = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines = [header, lr_label, ""]
    lines += ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in table]
    lines.insert(4, "  ".join("-" * x for x in w))
    notes = [f"intervals: 95 % bootstrap over seeds and {stats_['n_test_examples']} test examples; "
             f"≈ = the paired difference's interval contains 0 (indistinguishable from {base}); "
             "rank = the places the paired intervals support"]
    if res:
        notes.append(f"resolution: one test example moves {metric} by {res:.{d}f}")
    if flags:
        notes.append("† schedules itself, on top of --schedule: " + "; ".join(flags))
    return "\n".join(lines + [""] + notes)


# ---- files -----------------------------------------------------------------------------------
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


def write_plot(path: Path, runs: list[dict[str, Any]], order: Sequence[str], *, title: str,
               metric: str, higher_is_better: bool) -> None:
    """``curves.png``: train loss (log scale) and the validation metric against step; one
    colour per optimizer, the line the mean over seeds, the band their range (min to max:
    unlike mean ± std it stays positive on a log axis)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_val = fig.subplots(1, 2)
    finals = [r for r in runs if r["split"] == "test"]
    for i, name in enumerate(order):
        mine = [r for r in finals if r["optimizer"] == name]
        if not mine:
            continue
        colour, style = f"C{i % 10}", ("-" if i < 10 else "--")
        label = f"{name} (lr {mine[0]['hyperparameters'].get('lr', math.nan):.3g})"
        for ax, key in ((ax_loss, "train_loss"), (ax_val, "val_metric")):
            steps, mean, lo, hi = _band([r[key] for r in mine])
            if not steps:
                continue
            ax.plot(steps, mean, style, color=colour, label=label, lw=1.5)
            if len(mine) > 1:
                ax.fill_between(steps, lo, hi, color=colour, alpha=0.2, lw=0)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("train loss (window mean)")
    ax_val.set_xlabel("step")
    ax_val.set_ylabel(f"validation {metric}")
    # zoom on the second half of training, where optimizers differ; early points clip
    late = [v for r in finals for v in r["val_metric"]["value"][len(r["val_metric"]["value"]) // 2:]
            if v is not None and math.isfinite(v)]
    if late:
        lo_v, hi_v = min(late), max(late)
        pad = 0.1 * (hi_v - lo_v) + 1e-12
        ax_val.set_ylim(lo_v - pad, hi_v + pad)
    for ax in (ax_loss, ax_val):
        ax.grid(True, alpha=0.3)
    ax_val.legend(fontsize=8, loc="lower right" if higher_is_better else "upper right")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


# ---- --report: merging saved comparisons -------------------------------------------------------
_MUST_AGREE = ("task", "model", "steps", "batch_size", "schedule", "data_sha256", "metric")


def merge(results: list[dict[str, Any]], sources: list[str]) -> dict[str, Any]:
    """One results dict from several (e.g. seeds run on different machines): they must agree on
    the task, its data and the training settings, and give each optimizer the same
    hyperparameters; a seed of an optimizer may appear only once."""
    if not results:
        raise ValueError("--report needs at least one folder with a results.json")
    first = results[0]
    for res, src in zip(results, sources):
        if res.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"{src}: results.json has schema version {res.get('schema_version')!r}; "
                             f"this optforge reads version {SCHEMA_VERSION}")
        for key in _MUST_AGREE:
            if res["config"].get(key) != first["config"].get(key):
                raise ValueError(f"{src}: {key} is {res['config'].get(key)!r}, but {sources[0]} has "
                                 f"{first['config'].get(key)!r}; only runs of one setup can be merged")
    runs: list[dict[str, Any]] = []
    seen: dict[tuple[str, int], str] = {}
    chosen: dict[str, Any] = {}
    order: list[str] = []
    for res, src in zip(results, sources):
        for r in res["runs"]:
            if r["split"] != "test":
                continue
            key = (r["optimizer"], r["seed"])
            if key in seen:
                raise ValueError(f"seed {r['seed']} of {r['optimizer']} is in both {seen[key]} and {src}")
            hp = chosen.setdefault(r["optimizer"], r["hyperparameters"])
            if hp != r["hyperparameters"]:
                raise ValueError(f"{src}: {r['optimizer']} ran with {r['hyperparameters']}, but "
                                 f"elsewhere with {hp}; only runs of one setup can be merged")
            seen[key] = src
            runs.append(r)
            if r["optimizer"] not in order:
                order.append(r["optimizer"])
    merged = dict(first)
    merged["runs"] = runs
    merged["config"] = {**first["config"], "optimizers": order,
                        "seeds": sorted({r["seed"] for r in runs})}
    merged["merged_from"] = [{"source": s, "provenance": r.get("provenance")}
                             for r, s in zip(results, sources)]
    merged["complete"] = all(r.get("complete") for r in results)
    return merged
