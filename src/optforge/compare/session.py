"""One comparison from its checked plan: tuning trials, the runs per seed, results.json (rewritten
after each run, so an interruption keeps the finished runs), the summary and the plot."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from .provenance import environment
from .report import SCHEMA_VERSION, summarize, write_json, write_plot
from .runner import DEFAULT_WARMUP, RunResult, train_run
from .tuning import TUNE_SEED, search_space, tune

__all__ = ["Session", "lr_label", "title"]


def lr_label(config: dict[str, Any]) -> str:
    """The line under the table that says how the learning rates were chosen."""
    source = config["lr_source"]
    if config["tune"]:
        text = (f"hyperparameters tuned: {config['budget']} quasi-random trials per optimizer, scored on "
                f"the validation split, the best retrained on every seed")
    else:
        text = ("learning rates: UNTUNED defaults (the registry's compare_lr, else the optimizer's "
                "default lr); --tune --budget K tunes every optimizer alike")
    given = [n for n, s in source.items() if s == "given"]
    return text + (f"; lr given for {', '.join(given)}" if given else "")


def title(config: dict[str, Any], task: dict[str, Any]) -> str:
    model = f" / {config['model']}" if config.get("model") else ""
    return (f"{task['name']}{model}: {len(config['optimizers'])} optimizers x {len(config['seeds'])} "
            f"seed(s) x {config['steps']} steps, batch {config['batch_size']}, schedule "
            f"{config['schedule']}")


class Session:
    def __init__(self, plan, out: Path | None, plot: bool, progress: bool, command: list[str],
                 echo) -> None:
        self.p, self.out, self.plot, self.progress = plan, out, plot, progress
        self.command, self.echo = command, echo or (lambda text: None)
        self.runs: list[RunResult] = []
        self.tuning: dict[str, Any] = {}

    def _base_hyperparameters(self, name: str) -> dict[str, Any]:
        hp: dict[str, Any] = {"lr": self.p.lrs[name], **self.p.kwargs[name]}
        if self.p.settings.schedule == "warmup_cosine":
            hp["schedule_warmup"] = DEFAULT_WARMUP
        return hp

    def results(self, complete: bool) -> dict[str, Any]:
        p, task = self.p, self.p.task
        runs = [r.to_json() for r in self.runs]
        return {
            "schema_version": SCHEMA_VERSION, "complete": complete, "provenance": self.provenance,
            "config": self.config, "task": self.task_info, "tuning": self.tuning or None,
            "summary": summarize(runs, p.optimizers, baseline=p.baseline,
                                 higher_is_better=task.metric.higher_is_better,
                                 resolution_per_example=task.metric.resolution_per_example),
            "runs": runs,
        }

    def _save(self, complete: bool) -> dict[str, Any]:
        res = self.results(complete)
        if self.out is not None:
            write_json(self.out / "results.json", res)
        return res

    def run(self) -> dict[str, Any]:
        from .api import Interrupted

        p, task, s = self.p, self.p.task, self.p.settings
        data = task.load()
        torch.manual_seed(0)
        n_params = sum(x.numel() for x in task.model_fn().parameters() if x.requires_grad)
        to_tune = p.optimizers if p.tune else []
        self.task_info = {
            "name": task.name, "description": task.description, "model": p.model,
            "model_description": task.model_description, "n_params": n_params,
            "n_train": len(data.train), "n_val": len(data.val), "n_test": len(data.test),
            "metric": task.metric.name, "higher_is_better": task.metric.higher_is_better,
        }
        self.config = {
            "task": task.name, "model": p.model, "optimizers": p.optimizers, "seeds": p.seeds,
            "steps": s.steps, "batch_size": s.batch_size, "eval_every": s.eval_every,
            "log_every": s.log_every, "target": s.target, "schedule": s.schedule,
            "tune": p.tune, "budget": p.budget if p.tune else None,
            "tune_seed": TUNE_SEED if p.tune else None, "baseline": p.baseline,
            "lr_source": p.lr_source, "optimizer_args": p.kwargs, "metric": task.metric.name,
            "data_sha256": data.sha256(),
        }
        self.provenance = environment(self.command, task.source)
        n_runs = len(to_tune) * p.budget + len(p.optimizers) * len(p.seeds)
        self.echo(f"{title(self.config, self.task_info)}{' (+ tuning)' if to_tune else ''}"
                  + (f" -> {self.out}" if self.out else ""))
        from tqdm.auto import tqdm

        bar = tqdm(total=n_runs * s.steps, unit="step", dynamic_ncols=True, smoothing=0.05, leave=False,
                   disable=None if self.progress else True)
        lines = self.progress and bar.disable      # no bar (stderr is not a terminal): a line per run
        done, start = 0, time.perf_counter()

        def timed(text: str, name: str, hp: dict[str, Any], seed: int, split: str) -> RunResult:
            nonlocal done
            done += 1
            bar.set_description(f"run {done}/{n_runs} {text}")
            t0 = time.perf_counter()
            res = train_run(task, data, name, hp, seed, s, split=split, progress=bar.update)
            if lines:
                now = time.perf_counter()
                self.echo(f"run {done}/{n_runs} {text}: {now - t0:.1f} s"
                          f"{' (diverged)' if res.diverged else ''}, {now - start:.0f} s elapsed")
            return res

        hps = {n: self._base_hyperparameters(n) for n in p.optimizers}
        try:
            for name in to_tune:
                dims = search_space(name, p.lrs[name], p.kwargs[name], p.lr_source[name] == "given",
                                    s.schedule)

                def trial(hp: dict[str, Any], name: str = name) -> RunResult:
                    return timed(f"tune {name}", name, hp, TUNE_SEED, "val")

                self.tuning[name] = tune(name, hps[name], dims, p.budget, s.steps, trial,
                                         task.metric.higher_is_better)
                hps[name] = self.tuning[name]["chosen_hyperparameters"]
                self._save(complete=False)
            for seed in p.seeds:
                for name in p.optimizers:
                    self.runs.append(timed(f"{name} seed {seed}", name, hps[name], seed, "test"))
                    self._save(complete=False)
        except KeyboardInterrupt:
            bar.close()
            res = self._save(complete=False)
            self._plot(res, interrupted=True)
            raise Interrupted(res) from None
        bar.close()
        res = self._save(complete=True)
        self._plot(res)
        return res

    def _plot(self, res: dict[str, Any], interrupted: bool = False) -> None:
        if self.out is None or not self.plot or not self.runs:
            return
        write_plot(self.out / "curves.png", res["runs"], self.p.optimizers,
                   title=title(res["config"], res["task"]) + (" (interrupted)" if interrupted else ""),
                   metric=self.p.task.metric.name, higher_is_better=self.p.task.metric.higher_is_better)
