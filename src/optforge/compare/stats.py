"""Intervals for a comparison: a bootstrap over seeds and test examples.

An optimizer's result is a matrix ``M[s, i]``: the test metric of example ``i`` after the run
with seed ``s``; its metric is the mean of ``M``, and a paired difference is the mean of
``M_a - M_b`` (same seed, same example). Two sources of chance move such a mean: the seed
(initialisation and data order) and the finite test set. With ``M = m + r_s + c_i + e_si``
(row, column and residual effects):

- test examples: the per-example means over seeds (``m + c_i + mean_s e_si``) are resampled,
  which carries the example and the residual variance;
- seeds: the row effects ``r_s`` are resampled, scaled so their variance is the seed variance
  that remains after the residual's share is taken out of the row means' variance (an
  ANOVA estimate, floored at 0), and widened by ``t / z`` (Student's t quantile with
  ``n_seeds - 1`` degrees of freedom over the normal one), because a handful of seeds says
  little about their own spread; with one seed there is no seed term.

Each replicate adds both resampled means; the interval is the 2.5th to 97.5th percentile
of 2,000 replicates. Resampling seeds and examples together (the pigeonhole bootstrap)
would count the residual twice; the split above does not. The draws are seeded: the same
results give the same intervals.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["Replicates", "interval", "rank_ranges"]

N_BOOT = 2000
LEVEL = 0.95


# Student's t 97.5 % quantiles for 1..30 degrees of freedom (two-sided 95 %)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042)
_Z975 = 1.959964


def _t975(df: int) -> float:
    return _T975[df - 1] if df <= len(_T975) else _Z975 + 2.4 / df


class Replicates:
    """Bootstrap replicates of the mean of seeds x examples matrices, all from one set of draws
    (seeded), so that intervals of different optimizers use the same resampled seeds and
    examples."""

    def __init__(self, n_seeds: int, n_examples: int, n_boot: int = N_BOOT, seed: int = 0) -> None:
        if n_seeds < 1 or n_examples < 1:
            raise ValueError(f"need at least one seed and one example, got {n_seeds} x {n_examples}")
        rng = np.random.default_rng(seed)
        self.n_seeds, self.n_examples = n_seeds, n_examples
        self.seed_weights = rng.multinomial(n_seeds, [1 / n_seeds] * n_seeds, size=n_boot) / n_seeds
        self.example_weights = rng.multinomial(n_examples, [1 / n_examples] * n_examples,
                                               size=n_boot) / n_examples

    def of(self, m: np.ndarray) -> np.ndarray:
        """Replicates of the mean of ``m`` (seeds x examples); for a paired difference pass
        the difference of the two matrices."""
        m = np.asarray(m, dtype=np.float64)
        if m.shape != (self.n_seeds, self.n_examples):
            raise ValueError(f"expected a {self.n_seeds} x {self.n_examples} matrix, got {m.shape}")
        grand = m.mean()
        per_example = m.mean(0)
        reps = grand + self.example_weights @ (per_example - grand)
        n = self.n_seeds
        if n > 1:
            rows = m.mean(1) - grand
            resid = m - rows[:, None] - per_example[None, :]
            resid_var = (resid ** 2).sum() / max((n - 1) * (self.n_examples - 1), 1)
            seed_var = max(0.0, (rows ** 2).sum() / (n - 1) - resid_var / self.n_examples)
            spread = (rows ** 2).mean()
            if spread > 0 and seed_var > 0:
                scale = np.sqrt(seed_var / spread) * _t975(n - 1) / _Z975
                reps = reps + self.seed_weights @ (scale * rows)
        return reps


def interval(replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    lo, hi = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def rank_ranges(results: Mapping[str, np.ndarray], replicates: Replicates, higher_is_better: bool,
                level: float = LEVEL) -> dict[str, tuple[int, int]]:
    """Each optimizer's supported rank range (``results``: its seeds x examples matrix): from
    1 + (how many are better beyond doubt) to N - (how many are worse beyond doubt), "beyond
    doubt" meaning that the interval of the paired difference excludes 0."""
    names = list(results)
    sign = 1.0 if higher_is_better else -1.0
    better = {n: 0 for n in names}
    worse = {n: 0 for n in names}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            lo, hi = interval(replicates.of(sign * (results[a] - results[b])), level)
            if lo > 0:
                better[b] += 1
                worse[a] += 1
            elif hi < 0:
                better[a] += 1
                worse[b] += 1
    return {n: (1 + better[n], len(names) - worse[n]) for n in names}
