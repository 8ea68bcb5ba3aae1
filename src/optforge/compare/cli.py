"""Train a small model on real data with several optimizers and compare them.

Each optimizer trains the same model from the same initialisation, on the same minibatch
order, once per seed; the table reports the mean ± std over seeds of the final test accuracy,
test and train loss, the steps to reach a target train loss, the time per step and the
optimizer's state bytes per parameter. DIR/results.json holds every curve and the full
configuration (rewritten after each run, so Ctrl-C keeps the finished runs), DIR/curves.png
plots train loss and test accuracy against step (line: mean over seeds; band: min to max).

Tasks (nothing is downloaded): linear (y = 5x + 10), digits (scikit-learn 8x8 digits;
models mlp, cnn), mnist1d (MNIST-1D; models logistic, mlp, cnn as in its paper).

Learning rates: --lr, else the registry's compare_lr (sgd 0.1; noam 5.0, as Noam's lr is a
scale of its schedule), else the optimizer's default lr.
--tune trains each optimizer without an explicit --lr at 5 log-spaced lrs from 1/10x to 10x
its starting lr (first seed, validation split carved out of the training split) and keeps
the one with the best final validation accuracy (validation loss for linear).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .tasks import Task

__all__ = ["add_arguments", "run"]

DEFAULT_OPTIMIZERS = "sgd,momentum_sgd,adam,adamw,radam,adabelief,compass"
OPTIONAL_MODULES = frozenset({"tqdm", "matplotlib", "sklearn", "mnist1d"})   # optforge[compare]

EPILOG = """\
examples:
  optforge compare                                  # digits, MLP, 7 optimizers x 3 seeds
  optforge compare --task digits --model cnn --optimizers sgd,adam --lr sgd=0.05,adam=3e-3
  optforge compare --task mnist1d --model mlp --optimizers adam --lr adam=1e-2   # the paper's setup
  optforge compare --tune --optimizer_args adam:betas=0.9,0.99 weight_decay=1e-4
"""


def _per_task(attr: str) -> str:
    from .tasks import TASKS

    return ", ".join(f"{t.name} {getattr(t, attr):g}" for t in TASKS.values())


def _models_help() -> str:
    from .tasks import TASKS

    return "; ".join(f"{t.name}: " + ", ".join(m + (" (default)" if m == t.default_model else "")
                                               for m in t.models) for t in TASKS.values())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The compare command's options (defaults that depend on the task are resolved in run)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG

    def one_line_error(message: str) -> None:      # argparse's own errors: one line too
        sys.exit(_error(f"{message} (see optforge compare --help)"))

    parser.error = one_line_error  # type: ignore[method-assign]
    parser.add_argument("--task", default="digits", help="linear, digits or mnist1d (default: digits)")
    parser.add_argument("--model", default=None, help=_models_help())
    parser.add_argument("--optimizers", default=DEFAULT_OPTIMIZERS,
                        help=f"comma-separated names or aliases (default: {DEFAULT_OPTIMIZERS})")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"optimizer steps per run (default: {_per_task('steps')})")
    parser.add_argument("--seeds", default="3",
                        help="number of seeds (0..N-1) or a comma list of seeds (default: 3)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"minibatch size (default: {_per_task('batch_size')})")
    parser.add_argument("--lr", action="append", metavar="NAME=LR[,NAME=LR...]",
                        help="learning rates, e.g. adam=1e-3,sgd=0.1 (repeatable); a bare value "
                             "sets every optimizer")
    parser.add_argument("--optimizer_args", "--optimizer-args", dest="optimizer_args", nargs="+",
                        action="extend", metavar="[NAME:]KEY=VALUE",
                        help="extra constructor arguments, e.g. adam:betas=0.9,0.99 "
                             "compass:centralization=1; without NAME: for every optimizer")
    parser.add_argument("--tune", action="store_true",
                        help="choose each lr by a 5-point log sweep on a validation split")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output folder for results.json and curves.png (default: runs/<task>)")
    parser.add_argument("--target-loss", type=float, default=None,
                        help="train loss for the 'steps to target' column "
                             f"(default: {_per_task('target_loss')})")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="steps between test evaluations (default: steps/20)")
    parser.add_argument("--log-every", type=int, default=None,
                        help="steps per train-loss window (default: steps/100)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default: 1; these models are too small to gain "
                             "from more, and spinning threads stall on a busy machine)")
    parser.add_argument("--no-plot", action="store_true", help="do not write curves.png")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (it is shown only when stderr is a terminal)")


def _error(msg: str) -> int:
    print(f"optforge compare: error: {msg}", file=sys.stderr)
    return 2


def _positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{flag} must be at least 1, got {value}")


def _check_out(out: Path) -> None:
    """Create ``out`` and prove a file can be written there (OSError otherwise)."""
    out.mkdir(parents=True, exist_ok=True)
    probe = out / f".optforge-write-test-{os.getpid()}"
    probe.write_text("")
    probe.unlink()


@dataclass(frozen=True)
class Comparison:
    """Every value of one ``optforge compare`` invocation, checked."""

    task: Task
    model: str
    optimizers: list[str]
    lrs: dict[str, float]                 # starting lr of each optimizer
    explicit_lrs: dict[str, float]        # the ones given by --lr (never tuned)
    kwargs: dict[str, dict[str, Any]]     # --optimizer_args per optimizer
    seeds: list[int]
    steps: int
    batch_size: int
    target_loss: float | None
    eval_every: int
    log_every: int
    out: Path
    threads: int
    tune: bool
    plot: bool
    progress: bool


def _resolve(args: argparse.Namespace) -> Comparison:
    """Check every value; ValueError with a one-line message for the first bad one."""
    from .options import (
        check_optimizer,
        default_lr,
        parse_lrs,
        parse_optimizer_args,
        parse_optimizers,
        parse_seeds,
    )
    from .tasks import get_task

    task = get_task(args.task)
    model = task.check_model(args.model)
    optimizers = parse_optimizers(args.optimizers)
    explicit = parse_lrs(args.lr, optimizers)
    kwargs = parse_optimizer_args(args.optimizer_args, optimizers)
    seeds = parse_seeds(args.seeds)
    for value, flag in ((args.steps, "--steps"), (args.batch_size, "--batch-size"),
                        (args.eval_every, "--eval-every"), (args.log_every, "--log-every"),
                        (args.threads, "--threads")):
        _positive(value, flag)
    steps = args.steps or task.steps
    lrs = {name: explicit.get(name, default_lr(name)) for name in optimizers}
    for name in optimizers:
        check_optimizer(name, lrs[name], kwargs[name])
    out = Path(args.out) if args.out else Path("runs") / task.name
    try:
        _check_out(out)
    except OSError as e:
        raise ValueError(f"cannot write to --out {str(out)!r}: {e.strerror or e}") from None
    return Comparison(
        task=task, model=model, optimizers=optimizers, lrs=lrs, explicit_lrs=explicit,
        kwargs=kwargs, seeds=seeds, steps=steps, batch_size=args.batch_size or task.batch_size,
        target_loss=task.target_loss if args.target_loss is None else args.target_loss,
        eval_every=args.eval_every or max(1, steps // 20),
        log_every=args.log_every or max(1, steps // 100),
        out=out, threads=args.threads, tune=args.tune, plot=not args.no_plot,
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    """``optforge compare``: 0 on success, 2 on bad input, 130 on Ctrl-C."""
    try:
        cfg = _resolve(args)
    except ValueError as e:
        return _error(str(e))
    import torch

    threads = torch.get_num_threads()
    try:
        return _compare(cfg)
    except ModuleNotFoundError as e:
        if e.name not in OPTIONAL_MODULES:
            raise
        return _error(f"{e}; install the extras: pip install 'optforge[compare]'")
    except OSError as e:
        return _error(f"cannot write results to {str(cfg.out)!r}: {e.strerror or e}")
    finally:
        torch.set_num_threads(threads)          # leave the caller's setting as it was


def _compare(cfg: Comparison) -> int:
    import torch
    from tqdm.auto import tqdm

    from .. import __version__
    from .report import SCHEMA_VERSION, format_table, summarize, write_json, write_plot
    from .runner import Settings, lr_grid, train_run, tune_lr

    torch.set_num_threads(cfg.threads)
    task, model, optimizers = cfg.task, cfg.model, cfg.optimizers
    data = task.load()
    settings = Settings(cfg.steps, cfg.batch_size, cfg.log_every, cfg.eval_every,
                        cfg.target_loss)
    to_tune = [n for n in optimizers if n not in cfg.explicit_lrs] if cfg.tune else []
    grids = {n: lr_grid(cfg.lrs[n]) for n in to_tune}
    n_runs = sum(map(len, grids.values())) + len(optimizers) * len(cfg.seeds)
    out: Path = cfg.out
    json_path, png_path = out / "results.json", out / "curves.png"

    lrs = dict(cfg.lrs)
    tuning: dict[str, Any] = {}
    runs: list = []
    config = {
        "task": task.name, "model": model, "optimizers": optimizers, "seeds": cfg.seeds,
        "steps": cfg.steps, "batch_size": cfg.batch_size, "eval_every": cfg.eval_every,
        "log_every": cfg.log_every, "target_loss": cfg.target_loss, "threads": cfg.threads,
        "tune": cfg.tune, "lr": lrs, "lr_source": {
            n: "--lr" if n in cfg.explicit_lrs else ("tuned" if n in to_tune else "default")
            for n in optimizers},
        "optimizer_args": cfg.kwargs,
    }
    n_params = sum(p.numel() for p in task.build_model(model).parameters())
    task_info = {"name": task.name, "description": task.description, "model": model,
                 "model_description": task.model_help.get(model, model),
                 "n_params": n_params, "n_train": len(data.x_train), "n_val": len(data.x_val),
                 "n_test": len(data.x_test),
                 "metric": "accuracy" if data.classification else "loss",
                 "loss": "cross_entropy" if data.classification else "mse"}

    def save(complete: bool) -> None:
        write_json(json_path, {
            "schema_version": SCHEMA_VERSION, "complete": complete,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "optforge_version": __version__, "torch_version": torch.__version__,
            "config": config, "task": task_info, "tuning": tuning or None,
            "summary": summarize(runs, optimizers), "runs": [r.to_json() for r in runs],
        })

    print(f"{task.name}/{model}: {len(optimizers)} optimizers x {len(cfg.seeds)} seeds x "
          f"{cfg.steps} steps{' (+ lr tuning)' if to_tune else ''} -> {out}", file=sys.stderr)
    bar = tqdm(total=n_runs * cfg.steps, unit="step", file=sys.stderr, dynamic_ncols=True,
               disable=None if cfg.progress else True, smoothing=0.05, leave=False)
    done = 0

    def describe(text: str) -> None:
        nonlocal done
        done += 1
        bar.set_description(f"run {done}/{n_runs} {text}")

    try:
        for name in to_tune:
            tuning[name] = tune_lr(task, model, data, name, grids[name], cfg.kwargs[name],
                                   cfg.seeds[0], settings, progress=bar.update,
                                   before_run=lambda lr, name=name: describe(f"tune {name} lr={lr:.3g}"))
            lrs[name] = tuning[name]["chosen_lr"]
        for seed in cfg.seeds:
            for name in optimizers:
                describe(f"{name} seed {seed}")
                runs.append(train_run(task, model, data, name, lrs[name], cfg.kwargs[name], seed,
                                      settings, progress=bar.update))
                save(complete=False)
    except KeyboardInterrupt:
        bar.close()
        save(complete=False)
        if runs and cfg.plot:
            write_plot(png_path, runs, optimizers, title=_title(cfg, interrupted=True),
                       classification=data.classification)
        if runs:
            print(format_table(summarize(runs, optimizers), classification=data.classification,
                               target_loss=cfg.target_loss, tuned=tuning))
        print(f"optforge compare: interrupted; {len(runs)} finished run(s) written to {json_path}",
              file=sys.stderr)
        return 130
    bar.close()
    save(complete=True)
    if cfg.plot:
        write_plot(png_path, runs, optimizers, title=_title(cfg), classification=data.classification)
    if tuning:
        print(_format_tuning(tuning, data.classification))
        print()
    print(format_table(summarize(runs, optimizers), classification=data.classification,
                       target_loss=cfg.target_loss, tuned=tuning))
    print()
    print(f"results: {json_path}" + (f"\nplot:    {png_path}" if cfg.plot else ""))
    return 0


def _title(cfg: Comparison, interrupted: bool = False) -> str:
    t = (f"{cfg.task.name} / {cfg.model}: {cfg.steps} steps, batch {cfg.batch_size}, "
         f"{len(cfg.seeds)} seed(s)")
    return t + (" (interrupted)" if interrupted else "")


def _format_tuning(tuning: dict[str, Any], classification: bool) -> str:
    key, label = ("val_acc", "val acc %") if classification else ("val_loss", "val loss")
    lines = [f"lr sweep ({label} at each lr; * = chosen):"]
    for name, t in tuning.items():
        cells = []
        for lr, v in zip(t["grid"], t[key]):
            mark = "*" if lr == t["chosen_lr"] else " "
            shown = "diverged" if v is None or v != v else (f"{v:.1f}" if classification else f"{v:.3g}")
            cells.append(f"{lr:.3g}:{shown}{mark}")
        edge = t["chosen_lr"] in (t["grid"][0], t["grid"][-1]) and len(t["grid"]) > 1
        lines.append(f"  {name:<14} " + "  ".join(cells)
                     + ("   (at the sweep's edge: the best lr may lie beyond)" if edge else ""))
    return "\n".join(lines)
