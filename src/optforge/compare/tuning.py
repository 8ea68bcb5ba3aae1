"""``--tune --budget K``: the same number of trials, from a declared search space, for every
optimizer.

Search space of an optimizer (a dimension is left out when ``--lr`` / ``--optimizer_args``
fixes it, or when the optimizer does not have the hyperparameter):

- ``lr``: log-uniform from 1/10 to 10 times its starting lr (the registry's ``compare_lr``,
  else its default lr);
- each of ``betas`` and ``momentum`` (when its default is not 0): ``1 - beta`` log-uniform
  from a quarter to four times ``1 - default`` (at most 0.5);
- ``weight_decay``: log-uniform over [1e-4, 0.1] when decoupled, [1e-6, 1e-3] when coupled
  (L2 in the gradient) or absolute;
- the warmup as a fraction of the steps, uniform over [0, 0.2]: the schedule's
  (``schedule_warmup``, with ``--schedule warmup_cosine``) and the optimizer's own
  (``warmup`` of Noam and AdamWarmup, ``warmup_steps`` of Schedule-Free), each where it exists.

Points are quasi-random: the first K points of a scrambled Sobol sequence seeded by
``TUNE_SEED``, mapped onto each optimizer's dimensions. Every trial trains on the training
split (validation excluded) with the seed ``TUNE_SEED``, which is not among the evaluated
seeds, and is scored by its final validation metric; a diverged trial scores worst. The
winner is retrained on every evaluated seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..factory import resolve_optimizer_name
from .runner import RunResult

__all__ = ["Dimension", "TUNE_SEED", "best_trial", "sample", "search_space"]

TUNE_SEED = 1_000_003
WARMUP_RANGE = (0.0, 0.2)
OWN_WARMUP = ("warmup", "warmup_steps")      # an optimizer's own lr warmup, in steps


@dataclass(frozen=True)
class Dimension:
    """One hyperparameter: ``key`` (with ``index`` into a tuple such as betas), its scale
    (``log``, ``one_minus_log``: 1 - value is log-uniform, ``uniform``) and its range."""

    key: str
    scale: str
    low: float
    high: float
    index: int | None = None

    def value(self, u: float) -> float:
        if self.scale == "uniform":
            return self.low + u * (self.high - self.low)
        lo, hi = math.log(self.low), math.log(self.high)
        v = math.exp(lo + u * (hi - lo))
        return 1 - v if self.scale == "one_minus_log" else v

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _one_minus(key: str, default: float, index: int | None = None) -> Dimension | None:
    gap = 1 - float(default)
    if not 0 < gap < 1:
        return None
    return Dimension(key, "one_minus_log", gap / 4, min(4 * gap, 0.5), index)


def search_space(name: str, start_lr: float, fixed: dict[str, Any], lr_fixed: bool,
                 schedule: str) -> list[Dimension]:
    """The dimensions searched for optimizer ``name`` (see the module docstring)."""
    info, _ = resolve_optimizer_name(name)
    defaults = info.defaults
    dims: list[Dimension] = []
    if not lr_fixed:
        dims.append(Dimension("lr", "log", start_lr / 10, start_lr * 10))
    if "betas" in defaults and "betas" not in fixed and isinstance(defaults["betas"], (tuple, list)):
        dims += [d for i, b in enumerate(defaults["betas"]) if (d := _one_minus("betas", b, i))]
    if "momentum" in defaults and "momentum" not in fixed and isinstance(defaults["momentum"], float):
        dims += [d for d in [_one_minus("momentum", defaults["momentum"])] if d]
    if "weight_decay" in defaults and "weight_decay" not in fixed:
        mode = fixed.get("weight_decay_mode", defaults.get("weight_decay_mode", "decoupled"))
        low, high = (1e-4, 0.1) if mode == "decoupled" else (1e-6, 1e-3)
        dims.append(Dimension("weight_decay", "log", low, high))
    if schedule == "warmup_cosine":
        dims.append(Dimension("schedule_warmup", "uniform", *WARMUP_RANGE))
    dims += [Dimension(k, "uniform", *WARMUP_RANGE) for k in OWN_WARMUP if k in defaults and k not in fixed]
    return dims


def sample(dims: list[Dimension], budget: int, steps: int, defaults: dict[str, Any]) -> list[dict[str, Any]]:
    """``budget`` hyperparameter sets: the first ``budget`` points of a scrambled Sobol
    sequence (seeded) over ``dims``. Tuple entries (betas) not searched keep ``defaults``'."""
    if not dims:
        return [{} for _ in range(budget)]
    engine = torch.quasirandom.SobolEngine(len(dims), scramble=True, seed=TUNE_SEED)
    points = engine.draw(budget, dtype=torch.float64).tolist()
    out = []
    for u in points:
        hp: dict[str, Any] = {}
        for d, ui in zip(dims, u):
            v = d.value(ui)
            if d.index is not None:
                current = list(hp.get(d.key, defaults[d.key]))
                current[d.index] = round(v, 6)
                hp[d.key] = tuple(current)
            elif d.key in OWN_WARMUP:
                hp[d.key] = max(round(v * steps), 1 if d.key == "warmup" and defaults[d.key] >= 1 else 0)
            else:
                hp[d.key] = float(f"{v:.4g}")
        out.append(hp)
    return out


def score(res: RunResult, higher_is_better: bool) -> float:
    """Larger is better; -inf for a diverged trial."""
    if res.diverged or not math.isfinite(res.final_val_metric):
        return -math.inf
    return res.final_val_metric if higher_is_better else -res.final_val_metric


def best_trial(trials: list[RunResult], higher_is_better: bool) -> int:
    """Index of the best trial (the first of equals)."""
    scores = [score(t, higher_is_better) for t in trials]
    return max(range(len(trials)), key=lambda i: (scores[i], -i))


def tune(name: str, base: dict[str, Any], dims: list[Dimension], budget: int, steps: int,
         train: Callable[[dict[str, Any]], RunResult], higher_is_better: bool) -> dict[str, Any]:
    """Run the trials of one optimizer: ``train(hyperparameters)`` trains one on the
    validation split; returns the JSON record and the winner's hyperparameters."""
    info, _ = resolve_optimizer_name(name)
    trials = [train({**base, **hp}) for hp in sample(dims, budget, steps, info.defaults)]
    best = best_trial(trials, higher_is_better)
    return {"space": [d.to_json() for d in dims], "budget": budget, "seed": TUNE_SEED,
            "trials": [{"hyperparameters": t.hyperparameters, "val_metric": t.final_val_metric,
                        "val_loss": t.final_val_loss, "diverged": t.diverged} for t in trials],
            "chosen": best, "chosen_hyperparameters": trials[best].hyperparameters}
