"""Draw each optimizer's path on 2-D test functions (the ``optforge visualize`` command).

Every optimizer starts from the same point of each function. Its lr is chosen per (optimizer,
function) by a small log-grid search around the optimizer's default lr: each grid lr runs the
full number of steps and the one with the lowest final function value wins (a run that leaves
the plotted domain or produces a non-finite value scores infinity). One PNG per function holds
a panel per optimizer; ``summary.json`` beside the PNGs records the chosen lr and the start and
final values of every path, and why an optimizer was skipped (one that needs a closure, or
cannot step a single 2-element tensor).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["FUNCTIONS", "TestFunction", "PathResult", "run_path", "tune_lr", "visualize",
           "add_arguments", "run"]


@dataclass(frozen=True)
class TestFunction:
    """A 2-D function, where paths start, its global minimum and the plotted domain."""

    name: str
    formula: str
    f: Callable[[Tensor, Tensor], Tensor]
    start: tuple[float, float]
    minimum: tuple[float, float]
    xlim: tuple[float, float]
    ylim: tuple[float, float]
    log_contours: bool = False   # contour log(f - f_min + 1): Rosenbrock's valley spans decades
    contour_levels: int = 15

    def value(self, xy: Tensor) -> Tensor:
        return self.f(xy[0], xy[1])

    def inside(self, x: float, y: float) -> bool:
        return self.xlim[0] <= x <= self.xlim[1] and self.ylim[0] <= y <= self.ylim[1]


def _rosenbrock(x: Tensor, y: Tensor) -> Tensor:
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def _rastrigin(x: Tensor, y: Tensor) -> Tensor:
    a = 10.0
    return 2 * a + x**2 - a * torch.cos(2 * math.pi * x) + y**2 - a * torch.cos(2 * math.pi * y)


def _saddle(x: Tensor, y: Tensor) -> Tensor:
    # x^2 - y^2 has a saddle at the origin; y^4/4 bounds it below (minima (0, +-sqrt 2), f = -1)
    return x**2 - y**2 + y**4 / 4


FUNCTIONS: dict[str, TestFunction] = {
    fn.name: fn for fn in (
        TestFunction("rosenbrock", "(1 - x)^2 + 100 (y - x^2)^2", _rosenbrock, (-2.0, 2.0), (1.0, 1.0),
                     (-2.5, 2.0), (-1.0, 3.0), log_contours=True),
        TestFunction("rastrigin", "20 + x^2 - 10 cos(2 pi x) + y^2 - 10 cos(2 pi y)", _rastrigin,
                     (-2.0, 3.5), (0.0, 0.0), (-4.5, 4.5), (-4.5, 4.5), contour_levels=6),
        TestFunction("saddle", "x^2 - y^2 + y^4 / 4", _saddle, (1.8, 0.01), (0.0, math.sqrt(2.0)),
                     (-2.0, 2.0), (-2.0, 2.0)),
    )
}


@dataclass
class PathResult:
    """One optimizer's path on one function at one lr."""

    optimizer: str
    function: str
    lr: float
    xy: list[tuple[float, float]]      # start point first, then one point per step
    values: list[float]                # f at each point of xy
    ok: bool                           # finite everywhere and inside the domain

    @property
    def score(self) -> float:
        return self.values[-1] if self.ok else math.inf


def _make_optimizer(info: Any, x: Tensor, lr: float) -> torch.optim.Optimizer:
    opt = info.cls([x], lr=lr)
    if hasattr(opt, "train") and callable(opt.train):
        opt.train()       # schedule-free optimizers step in train mode
    return opt


def run_path(info: Any, fn: TestFunction, lr: float, steps: int) -> PathResult:
    """``steps`` optimizer steps on ``fn`` from its start point (float64), without a closure."""
    x = torch.tensor(fn.start, dtype=torch.float64, requires_grad=True)
    opt = _make_optimizer(info, x, lr)
    xy = [fn.start]
    values = [float(fn.value(x.detach()))]
    ok = True
    for _ in range(steps):
        opt.zero_grad()
        loss = fn.value(x)
        loss.backward()
        opt.step()
        px, py = (float(v) for v in x.detach())
        value = float(fn.value(x.detach()))
        if not (math.isfinite(value) and fn.inside(px, py)):
            ok = False
            break
        xy.append((px, py))
        values.append(value)
    return PathResult(info.name, fn.name, lr, xy, values, ok)


def lr_grid(default_lr: float, points: int) -> list[float]:
    """``points`` log-spaced lrs from default/10^4 to default*1000 (half a decade apart at 15):
    default lrs are set for networks, whose gradients are far smaller than Rosenbrock's."""
    if points == 1:
        return [default_lr]
    lo, hi = math.log10(default_lr) - 4, math.log10(default_lr) + 3
    return [10 ** (lo + (hi - lo) * i / (points - 1)) for i in range(points)]


def tune_lr(info: Any, fn: TestFunction, steps: int, points: int = 15) -> PathResult:
    """The path of the grid lr with the lowest final value (the default lr's if none stays finite)."""
    default_lr = float(info.defaults.get("lr", 1e-3)) or 1e-3
    best: PathResult | None = None
    for lr in lr_grid(default_lr, points):
        result = run_path(info, fn, lr, steps)
        if best is None or result.score < best.score:
            best = result
    assert best is not None
    return best


def why_unusable(info: Any) -> str | None:
    """Why an optimizer cannot be drawn (None when it can): one step without a closure on a
    single 2-element float64 tensor must succeed."""
    x = torch.tensor([0.5, -0.5], dtype=torch.float64, requires_grad=True)
    try:
        opt = _make_optimizer(info, x, float(info.defaults.get("lr", 1e-3)) or 1e-3)
        (x**2).sum().backward()
        opt.step()
    except Exception as e:   # noqa: BLE001 - any failure means: skip it, and say why
        return f"{type(e).__name__}: {e}".splitlines()[0][:200]
    return None


def _select_optimizers(patterns: str) -> list[Any]:
    from .registry import get_optimizer_info, list_optimizers

    infos: dict[str, Any] = {}
    for pattern in (p.strip() for p in patterns.split(",") if p.strip()):
        hits = (list_optimizers(pattern, with_info=True) if any(c in pattern for c in "*?[")
                else [get_optimizer_info(pattern)])
        if not hits:
            raise ValueError(f"no optimizer matches {pattern!r} (see optforge list)")
        infos.update((i.name, i) for i in hits)
    return [infos[k] for k in sorted(infos)]


def _select_functions(names: str) -> list[TestFunction]:
    chosen = []
    for name in (n.strip().lower() for n in names.split(",") if n.strip()):
        if name not in FUNCTIONS:
            raise ValueError(f"unknown function {name!r} (choose from {', '.join(FUNCTIONS)})")
        chosen.append(FUNCTIONS[name])
    return chosen


PANEL_INCHES = 2.9


def plot_function(fn: TestFunction, paths: list[PathResult], out: Path, cols: int = 4) -> Path:
    """One PNG: a panel per optimizer, its path over the function's contours."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = max(len(paths), 1)
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    # sized to be read where the docs show it (about 800 px wide): 12-pt names, 10-pt details
    height = (PANEL_INCHES + 0.45) * rows + 0.6
    fig = Figure(figsize=(PANEL_INCHES * cols, height), dpi=80)
    FigureCanvasAgg(fig)
    xs = np.linspace(*fn.xlim, 160)
    ys = np.linspace(*fn.ylim, 160)
    gx, gy = np.meshgrid(xs, ys)
    with torch.no_grad():
        gz = fn.f(torch.from_numpy(gx), torch.from_numpy(gy)).numpy()
    f_min = float(fn.f(torch.tensor(fn.minimum[0]), torch.tensor(fn.minimum[1])))
    levels_z = np.log1p(gz - f_min) if fn.log_contours else gz
    for k, result in enumerate(paths):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.contour(gx, gy, levels_z, levels=fn.contour_levels, cmap="viridis", linewidths=0.6)
        path = np.asarray(result.xy)
        ax.plot(path[:, 0], path[:, 1], color="tab:red", linewidth=1.2, marker=".", markersize=2.5)
        ax.plot(*fn.start, marker="o", color="black", markersize=5)
        ax.plot(*fn.minimum, marker="*", color="gold", markeredgecolor="black", markersize=11)
        ax.set_xlim(*fn.xlim)
        ax.set_ylim(*fn.ylim)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(result.optimizer, fontsize=12, fontweight="bold", pad=4)
        ax.set_xlabel(f"lr {result.lr:.3g}   final f {result.values[-1]:.3g}", fontsize=10, labelpad=3)
    fig.suptitle(f"{fn.name}: f = {fn.formula}   ({len(paths[0].xy) - 1 if paths else 0} steps; "
                 "black dot: start, star: minimum)", fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / height))      # the top 0.5 inch: the suptitle
    target = out / f"{fn.name}.png"
    fig.savefig(target)
    return target


def visualize(functions: str = ",".join(FUNCTIONS), optimizers: str = "*", steps: int = 300,
              out: str | Path = "runs/gallery", grid_points: int = 15,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Tune, run and plot; returns (and writes to ``out/summary.json``) what was drawn."""
    if steps < 1:
        raise ValueError(f"invalid steps={steps!r}: must be >= 1")
    if grid_points < 1:
        raise ValueError(f"invalid grid_points={grid_points!r}: must be >= 1")
    fns = _select_functions(functions)
    infos = _select_optimizers(optimizers)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)     # a 2-element tensor gains nothing from threads
    summary: dict[str, Any] = {"steps": steps, "grid_points": grid_points, "skipped": {},
                               "functions": {}}
    usable = []
    for info in infos:
        reason = why_unusable(info)
        if reason is None:
            usable.append(info)
        else:
            summary["skipped"][info.name] = reason
            log(f"skip {info.name}: {reason}")
    for fn in fns:
        paths = []
        for info in usable:
            best = tune_lr(info, fn, steps, grid_points)
            paths.append(best)
            log(f"{fn.name:10s} {info.name:20s} lr={best.lr:.3g}  f: {best.values[0]:.4g} -> "
                f"{best.values[-1]:.4g}")
        png = plot_function(fn, paths, out)
        summary["functions"][fn.name] = {
            "formula": fn.formula, "start": fn.start, "minimum": fn.minimum, "png": png.name,
            "paths": {p.optimizer: {"lr": p.lr, "start_value": p.values[0], "final_value": p.values[-1],
                                    "final_point": p.xy[-1], "steps_run": len(p.xy) - 1, "ok": p.ok}
                      for p in paths},
        }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--functions", default=",".join(FUNCTIONS),
                        help=f"comma list of: {', '.join(FUNCTIONS)} (default: all)")
    parser.add_argument("--optimizers", default="*",
                        help="comma list of names, aliases or wildcards (default: every registered one)")
    parser.add_argument("--steps", type=int, default=300, help="steps per path (default: 300)")
    parser.add_argument("--grid-points", type=int, default=15,
                        help="lrs tried per (optimizer, function), log-spaced from default/10^4 to "
                             "default*1000 (default: 15)")
    parser.add_argument("--out", default="runs/gallery", help="output folder (default: runs/gallery)")


def run(args: argparse.Namespace) -> int:
    try:
        visualize(args.functions, args.optimizers, args.steps, args.out, args.grid_points)
    except ValueError as e:
        print(f"optforge visualize: {e}", file=sys.stderr)
        return 2
    print(f"images and summary.json: {args.out}")
    return 0
