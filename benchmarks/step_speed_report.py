"""Tables of one step_speed.py run, as docs/benchmarks.md shows them, and the compact JSON that
plot_step_speed.py draws.

    python benchmarks/step_speed.py --json runs/step_speed.json
    python benchmarks/step_speed_report.py runs/step_speed.json --compact benchmarks/step_speed_DATE.json

Every number comes from the one run: step time / torch AdamW(fused=True)'s, a bold ✗ where the
entry's target (step_speed.py's ``target_of``) was missed in that run, and the memory table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

PATH_ORDER = {"default": 0, "eager": 1, "fused": 2}


def _cell(row: dict[str, Any] | None, key: str = "ratio_fused") -> str:
    if not row or "median_ms" not in row:
        return "-"
    text = f"{row[key]:.2f}"
    return f"**{text}** ✗" if row.get("target_met") is False else text


def _split(entry: str) -> tuple[str, str, str]:
    source, rest = entry.split(".", 1)
    name, path = rest.rstrip("]").split("[")
    return source, name, path


def optforge_table(run: dict[str, Any]) -> list[str]:
    wl = list(run["workloads"])
    entries = {e for s in run["workloads"].values() for e in s["entries"] if e.startswith("optforge.")}
    rows = sorted(entries, key=lambda e: (_split(e)[1], PATH_ORDER.get(_split(e)[2], 9)))
    out = ["| optimizer | path | " + " | ".join(wl) + " |", "|---|---|" + "---|" * len(wl)]
    for e in rows:
        _, name, path = _split(e)
        cells = [_cell(run["workloads"][w]["entries"].get(e)) for w in wl]
        if all(c == "-" for c in cells):
            continue
        out.append(f"| {name} | {path} | " + " | ".join(cells) + " |")
    return out


def _entries(run: dict[str, Any], skip: str) -> list[str]:
    """Every entry of the run, in first-seen order, but those whose name starts with ``skip``."""
    names: list[str] = []
    for s in run["workloads"].values():
        names += [e for e in s["entries"] if not e.startswith(skip) and e not in names]
    return names


def others_table(run: dict[str, Any]) -> list[str]:
    wl = list(run["workloads"])
    names = _entries(run, skip="optforge.")
    out = ["| entry | " + " | ".join(wl) + " |", "|---|" + "---|" * len(wl)]
    for e in names:
        cells = [_cell(run["workloads"][w]["entries"].get(e)) for w in wl]
        out.append(f"| `{e}` | " + " | ".join(cells) + " |")
    return out


def memory_table(run: dict[str, Any]) -> list[str]:
    wl = list(run["workloads"])
    names = _entries(run, skip="ref.")
    out = ["| entry | state | peak in a step | one-big rss |", "|---|---|---|---|"]
    for e in names:
        state, peak = [], []
        for w in wl:
            row = run["workloads"][w]["entries"].get(e) or {}
            n = run["workloads"][w]["n_params"]
            st, pk = row.get("state_bytes_per_param"), row.get("peak_extra_bytes")
            state.append("-" if st is None or "median_ms" not in row else f"{st:.2f}")
            peak.append("-" if pk is None or "median_ms" not in row else f"{pk / n:.1f}")
        big = (run["workloads"].get("one-big", {}).get("entries", {}).get(e) or {})
        rss = big.get("resident_bytes_per_param")
        if all(s == "-" for s in state):
            continue
        out.append(f"| `{e}` | {' / '.join(state)} | {' / '.join(peak)} | "
                   f"{'-' if rss is None or 'median_ms' not in big else f'{rss:.1f}'} |")
    return out


def compact(run: dict[str, Any]) -> dict[str, Any]:
    """The committed summary plot_step_speed.py reads."""
    wl = list(run["workloads"])
    meta = run["meta"]
    ratios: dict[str, dict[str, Any]] = {}
    for w in wl:
        for e, row in run["workloads"][w]["entries"].items():
            cell = None
            if "median_ms" in row:
                cell = {"x_foreach": round(row["ratio_foreach"], 3), "x_fused": round(row["ratio_fused"], 3)}
                if "target" in row:
                    cell.update(target_ratio=round(row["target_ratio"], 3),
                                limit=round(row["target_limit"], 3), met=row["target_met"])
            ratios.setdefault(e, {})[w] = cell
    return {"measured": f"{meta['date']} UTC, load average {meta.get('loadavg_start', 0):.1f} at start "
                        f"and {meta.get('loadavg_end', 0):.1f} at end, {meta['threads']} threads",
            "machine": f"{meta['cores']}-core {meta['cpu']}",
            "versions": meta["versions"],
            "workloads": {w: {"tensors": s["n_tensors"], "params": s["n_params"]}
                          for w, s in run["workloads"].items()},
            "add_reference_GBps": {w: s["add_gbps"] for w, s in run["workloads"].items()},
            "step_time_ratio": ratios}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="the JSON step_speed.py --json wrote")
    ap.add_argument("--compact", type=Path, help="write the summary plot_step_speed.py reads here")
    args = ap.parse_args(argv)
    run = json.loads(args.run.read_text())
    if "workloads" not in run or "meta" not in run:
        ap.error(f"{args.run} is not a step_speed.py --json file (no 'meta'/'workloads')")
    for title, table in (("optforge", optforge_table(run)), ("torch and peers", others_table(run)),
                         ("memory, bytes per parameter", memory_table(run))):
        print(f"\n### {title}\n")
        print("\n".join(table))
    if args.compact:
        args.compact.write_text(json.dumps(compact(run), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
