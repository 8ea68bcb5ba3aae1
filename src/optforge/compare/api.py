"""``optforge.compare.run``: a whole comparison from Python; the command line calls it too."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .tasks import Task, get_task, import_user_code

__all__ = ["DEFAULT_OPTIMIZERS", "Interrupted", "execute", "prepare", "run"]

DEFAULT_OPTIMIZERS = "sgd,momentum_sgd,adam,adamw,radam,adabelief,compass"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a comparison; ``results`` holds the runs that finished."""

    def __init__(self, results: dict[str, Any]) -> None:
        super().__init__()
        self.results = results


@dataclass(frozen=True)
class Plan:
    """Every value of one comparison, checked."""

    task: Task
    model: str | None
    optimizers: list[str]
    lrs: dict[str, float]                 # starting lr of each optimizer
    lr_source: dict[str, str]             # "default", "given" or "tuned"
    kwargs: dict[str, dict[str, Any]]     # constructor options per optimizer
    seeds: list[int]
    baseline: str
    tune: bool
    budget: int
    settings: Any                         # runner.Settings
    out: Path | None = None
    threads: int | None = None


def _positive(value: Any, name: str) -> None:
    if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _seeds(seeds: int | str | Sequence[int]) -> list[int]:
    from .options import parse_seeds

    if isinstance(seeds, str):
        return parse_seeds(seeds)
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        return parse_seeds(str(seeds))
    return parse_seeds(",".join(str(int(s)) for s in seeds) + ",")


def _lrs(lr: Any, optimizers: list[str]) -> dict[str, float]:
    from .options import parse_lrs

    if lr is None:
        return {}
    if isinstance(lr, (int, float)) and not isinstance(lr, bool):
        return parse_lrs([repr(float(lr))], optimizers)
    if isinstance(lr, dict):
        return parse_lrs([",".join(f"{k}={v!r}" for k, v in lr.items())], optimizers) if lr else {}
    return parse_lrs(list(lr), optimizers)


def _kwargs(args: Any, optimizers: list[str]) -> dict[str, dict[str, Any]]:
    from .options import canonical_name, parse_optimizer_args

    if not isinstance(args, dict):
        return parse_optimizer_args(list(args or []), optimizers)
    out = parse_optimizer_args([], optimizers)
    for key, options in args.items():
        name = canonical_name(key)
        if name not in optimizers:
            raise ValueError(f"optimizer_args names {key!r}, which is not among the optimizers")
        out[name].update(options)
    return out


def plan(task: str | Task, *, model: str | None, optimizers: str | Sequence[str] | None,
         steps: int | None, seeds: Any, lr: Any, optimizer_args: Any, tune: bool, budget: int,
         schedule: str, baseline: str | None, target: float | None, batch_size: int | None,
         eval_every: int | None, log_every: int | None) -> Plan:
    """Check every value; ValueError (or TypeError) with a one-line message for the first bad one."""
    from .options import canonical_name, check_optimizer, default_lr, parse_optimizers
    from .runner import SCHEDULES, Settings

    if isinstance(task, Task):
        if model is not None:
            raise ValueError("model applies to built-in tasks; a Task builds its own model")
    elif isinstance(task, str):
        task = get_task(task, model)
    else:
        raise TypeError(f"task must be a name, FILE.py:FUNCTION, MODULE:FUNCTION or a Task, got {task!r}")
    spec = optimizers if optimizers is not None else (task.default_optimizers or DEFAULT_OPTIMIZERS)
    names = parse_optimizers(spec if isinstance(spec, str) else ",".join(spec))
    explicit = _lrs(lr, names)
    kwargs = _kwargs(optimizer_args, names)
    for key, value in (("steps", steps), ("batch_size", batch_size), ("eval_every", eval_every),
                       ("log_every", log_every), ("budget", budget)):
        _positive(value, key)
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r} (choose from: {', '.join(SCHEDULES)})")
    if baseline is None:
        base = names[0]
    else:
        base = canonical_name(baseline)
        if base not in names:
            raise ValueError(f"baseline {baseline!r} is not among the optimizers ({','.join(names)})")
    lrs = {n: explicit.get(n, default_lr(n)) for n in names}
    for n in names:
        check_optimizer(n, lrs[n], kwargs[n])
    steps = steps or task.steps
    settings = Settings(steps=steps, batch_size=batch_size or task.batch_size,
                        log_every=log_every or max(1, steps // 100),
                        eval_every=eval_every or max(1, steps // 20),
                        target=task.target if target is None else float(target), schedule=schedule)
    source = {n: "given" if n in explicit else ("tuned" if tune else "default") for n in names}
    return Plan(task, model, names, lrs, source, kwargs, _seeds(seeds), base, tune, budget, settings)


def _command(kwargs: dict[str, Any]) -> list[str]:
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return [f"optforge.compare.run({args})"]


def run(task: str | Task = "digits", *, model: str | None = None,
        optimizers: str | Sequence[str] | None = None, steps: int | None = None,
        seeds: int | str | Sequence[int] = 3, lr: float | dict[str, float] | Sequence[str] | None = None,
        optimizer_args: dict[str, dict[str, Any]] | Sequence[str] | None = None, tune: bool = False,
        budget: int = 8, schedule: str = "constant", baseline: str | None = None,
        target: float | None = None, batch_size: int | None = None, eval_every: int | None = None,
        log_every: int | None = None, threads: int | None = None, out: str | Path | None = None,
        plot: bool = True, progress: bool = False, imports: Iterable[str] = (),
        command: list[str] | None = None, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Compare optimizers on ``task``; return what ``results.json`` holds (see
    docs/compare_schema.md) and, with ``out``, write it there with ``curves.png``.

    ``task``: a built-in name (``digits``, with ``model``), ``FILE.py:FUNCTION``,
    ``MODULE:FUNCTION``, or a :class:`~optforge.compare.Task`. ``optimizers``: names, aliases
    or wildcards (``"adam*"``), as a comma string or a list. ``lr``: one value for all, or
    ``{name: lr}``. ``optimizer_args``: ``{name: {option: value}}``. ``tune``: ``budget``
    trials per optimizer on the validation split (:mod:`optforge.compare.tuning`).
    ``schedule``: ``"constant"`` or ``"warmup_cosine"``, for every optimizer. ``baseline``:
    the optimizer the others are compared with (default: the first). ``target``: the
    validation metric for the time-to-result columns. ``imports``: modules or ``.py`` files
    to import first (ones that register optimizers). ``threads``: torch CPU threads during
    the comparison (default: leave as is). ``echo``: where to send one-line status messages.
    """
    call = dict(task=task if isinstance(task, str) else f"<Task {task.name}>", model=model,
                optimizers=optimizers, steps=steps, seeds=seeds, lr=lr, optimizer_args=optimizer_args,
                tune=tune, budget=budget, schedule=schedule, baseline=baseline, target=target)
    p = prepare(task, model=model, optimizers=optimizers, steps=steps, seeds=seeds, lr=lr,
                optimizer_args=optimizer_args, tune=tune, budget=budget, schedule=schedule,
                baseline=baseline, target=target, batch_size=batch_size, eval_every=eval_every,
                log_every=log_every, threads=threads, out=out, imports=imports)
    return execute(p, plot=plot, progress=progress, command=command or _command(call), echo=echo)


def prepare(task: str | Task, *, imports: Iterable[str] = (), threads: int | None = None,
            out: str | Path | None = None, **options: Any) -> Plan:
    """Import ``imports``, check every option (``plan``), ``threads`` and that ``out`` can be
    written: ValueError / TypeError before anything trains."""
    for item in imports:
        import_user_code(item, f"--import {item!r}")
    p = plan(task, **options)
    _positive(threads, "threads")
    return replace(p, out=None if out is None else check_out(Path(out)), threads=threads)


def check_out(out: Path) -> Path:
    """Create ``out`` and prove a file can be written there (ValueError otherwise)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".optforge-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write to --out {str(out)!r}: {e.strerror or e}") from None
    return out


def execute(p: Plan, *, plot: bool = True, progress: bool = False, command: list[str] | None = None,
            echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run a prepared comparison; the results dict (written to ``p.out`` when set)."""
    from .session import Session

    before = torch.get_num_threads()
    if p.threads is not None:
        torch.set_num_threads(p.threads)
    try:
        return Session(p, p.out, plot, progress, command or [], echo).run()
    finally:
        torch.set_num_threads(before)
