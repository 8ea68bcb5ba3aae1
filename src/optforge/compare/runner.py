"""The training loop of one compare run, and the lr sweep of ``--tune``.

A run is deterministic for its seed: ``torch.manual_seed(seed)`` before the model is built
and a ``torch.Generator`` seeded with ``seed`` for the data order (a fresh permutation of the
training split per epoch, the last incomplete batch dropped). The loop records

- ``train_loss``: the mean minibatch loss over each window of ``log_every`` steps,
- ``test_loss`` / ``test_acc``: on the whole evaluation split at step 0, every
  ``eval_every`` steps and at the last step,
- the median wall time of a whole step (forward, backward, ``opt.step()``) and of
  ``opt.step()`` alone,
- optimizer state bytes per parameter: the bytes of every tensor in ``opt.state`` (``step``
  included) over the number of parameter elements,
- ``steps_to_target``: the first logged step whose window-mean train loss is <= the target.

A non-finite loss stops the run; it is marked ``diverged`` and its final metrics are NaN.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..factory import create_optimizer
from .options import canonical_name
from .tasks import Dataset, Task

__all__ = ["RunResult", "Settings", "build_optimizer", "lr_grid", "state_bytes_per_param",
           "train_run", "tune_lr"]


@dataclass(frozen=True)
class Settings:
    """What every run of one comparison shares."""

    steps: int
    batch_size: int
    log_every: int
    eval_every: int
    target_loss: float | None


@dataclass
class RunResult:
    optimizer: str
    seed: int
    lr: float
    optimizer_kwargs: dict[str, Any]
    split: str                              # "test", or "val" for a tuning run
    steps_done: int = 0
    diverged: bool = False
    train_loss: dict[str, list] = field(default_factory=lambda: {"step": [], "value": []})
    test_loss: dict[str, list] = field(default_factory=lambda: {"step": [], "value": []})
    test_acc: dict[str, list] | None = None
    final_train_loss: float = math.nan
    final_test_loss: float = math.nan
    final_test_acc: float | None = None
    steps_to_target: int | None = None
    step_time_ms: float = math.nan          # median, forward + backward + opt.step()
    opt_step_time_ms: float = math.nan      # median, opt.step() alone
    state_bytes_per_param: float = math.nan
    wall_time_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def build_optimizer(name: str, params, lr: float, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    """The optimizer ``name`` (an alias, or ``lookahead_<name>``) over ``params``, with ``lr``
    and ``kwargs``."""
    return create_optimizer(params, name, lr=lr, **kwargs)


def state_bytes_per_param(opt: torch.optim.Optimizer, n_params: int) -> float:
    """Bytes of every tensor in the optimizer's ``state_dict`` (wrappers' too: Lookahead's slow
    weights), per parameter."""
    total = 0
    for st in opt.state_dict()["state"].values():
        for v in st.values():
            for x in v.values() if isinstance(v, dict) else (v,):    # low-bit state: codes, scales
                if torch.is_tensor(x):
                    total += x.numel() * x.element_size()
    return total / max(n_params, 1)


def _loss_fn(classification: bool) -> Callable[[Tensor, Tensor], Tensor]:
    return nn.functional.cross_entropy if classification else nn.functional.mse_loss


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, classification: bool,
             opt: torch.optim.Optimizer | None = None) -> tuple[float, float | None]:
    """(mean loss, accuracy in % or None) on a whole split. An optimizer with ``eval()`` and
    ``train()`` (Schedule-Free: the parameters to evaluate are x, not the training point y)
    is switched to eval for it and back."""
    switch = all(callable(getattr(opt, m, None)) for m in ("eval", "train"))
    model.eval()
    if switch:
        opt.eval()
    out = model(x)
    loss = _loss_fn(classification)(out, y).item()
    acc = (out.argmax(1) == y).float().mean().item() * 100 if classification else None
    model.train()
    if switch:
        opt.train()
    return loss, acc


def train_run(task: Task, model_name: str, data: Dataset, optimizer: str, lr: float,
              kwargs: dict[str, Any], seed: int, settings: Settings, *, split: str = "test",
              progress: Callable[[int], None] | None = None) -> RunResult:
    """Train ``task``'s ``model_name`` on ``data`` with one optimizer and seed.

    ``progress(n)`` is called after every ``log_every`` steps with the number of steps done
    since its last call (for a progress bar).
    """
    classification = data.classification
    loss_fn = _loss_fn(classification)
    torch.manual_seed(seed)
    model = task.build_model(model_name)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    opt = build_optimizer(optimizer, params, lr, kwargs)
    gen = torch.Generator().manual_seed(seed)

    res = RunResult(canonical_name(optimizer), seed, lr, dict(kwargs), split,
                    test_acc={"step": [], "value": []} if classification else None)

    def record_eval(step: int) -> None:
        loss, acc = evaluate(model, data.x_test, data.y_test, classification, opt)
        res.test_loss["step"].append(step)
        res.test_loss["value"].append(loss)
        if res.test_acc is not None:
            res.test_acc["step"].append(step)
            res.test_acc["value"].append(acc)

    n = len(data.x_train)
    bs = min(settings.batch_size, n)
    perm, pos = torch.randperm(n, generator=gen), 0
    step_times: list[float] = []
    opt_times: list[float] = []
    window, window_n, reported = 0.0, 0, 0
    start = time.perf_counter()
    record_eval(0)
    for step in range(1, settings.steps + 1):
        if pos + bs > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + bs]
        pos += bs
        t0 = time.perf_counter()
        loss = loss_fn(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        step_times.append(t2 - t0)
        opt_times.append(t2 - t1)
        value = loss.item()
        res.steps_done = step
        if not math.isfinite(value):
            res.diverged = True
            break
        window += value
        window_n += 1
        if step % settings.log_every == 0 or step == settings.steps:
            mean = window / window_n
            res.train_loss["step"].append(step)
            res.train_loss["value"].append(mean)
            if (res.steps_to_target is None and settings.target_loss is not None
                    and mean <= settings.target_loss):
                res.steps_to_target = step
            window, window_n = 0.0, 0
            if progress is not None:
                progress(step - reported)
                reported = step
        if step % settings.eval_every == 0 or step == settings.steps:
            record_eval(step)
    if progress is not None and res.steps_done < settings.steps:
        progress(settings.steps - reported)       # a diverged run still fills its share
    res.wall_time_s = time.perf_counter() - start
    if step_times:
        res.step_time_ms = statistics.median(step_times) * 1e3
        res.opt_step_time_ms = statistics.median(opt_times) * 1e3
    res.state_bytes_per_param = state_bytes_per_param(opt, n_params)
    if not res.diverged:
        if res.train_loss["value"]:
            res.final_train_loss = res.train_loss["value"][-1]
        res.final_test_loss = res.test_loss["value"][-1]
        if res.test_acc is not None:
            res.final_test_acc = res.test_acc["value"][-1]
    if res.diverged or not math.isfinite(res.final_test_loss):
        res.diverged = True
        res.final_train_loss = res.final_test_loss = math.nan
        if res.test_acc is not None:
            res.final_test_acc = math.nan
    return res


def lr_grid(base: float, points: int = 5, span: float = 10.0) -> list[float]:
    """``points`` log-spaced lrs from ``base / span`` to ``base * span`` (``base`` in the middle
    when ``points`` is odd)."""
    if points == 1:
        return [base]
    lo = math.log10(base) - math.log10(span)
    step = 2 * math.log10(span) / (points - 1)
    return [float(f"{10 ** (lo + i * step):.4g}") for i in range(points)]


def tuning_score(res: RunResult) -> tuple[float, float]:
    """Larger is better: (validation accuracy, -validation loss); (-inf, -inf) if diverged."""
    if res.diverged:
        return (-math.inf, -math.inf)
    acc = res.final_test_acc if res.final_test_acc is not None else -res.final_test_loss
    return (acc, -res.final_test_loss)


def tune_lr(task: Task, model_name: str, data: Dataset, optimizer: str, grid: list[float],
            kwargs: dict[str, Any], seed: int, settings: Settings,
            progress: Callable[[int], None] | None = None,
            before_run: Callable[[float], None] | None = None) -> dict[str, Any]:
    """Train once per lr of ``grid`` on the tuning split; return the grid, the validation
    scores and the chosen lr (best final validation accuracy, or loss for regression).
    ``before_run(lr)`` is called before each run (for a progress description)."""
    tuning = data.for_tuning()
    runs = []
    for lr in grid:
        if before_run is not None:
            before_run(lr)
        runs.append(train_run(task, model_name, tuning, optimizer, lr, kwargs, seed, settings,
                              split="val", progress=progress))
    best = max(range(len(grid)), key=lambda i: tuning_score(runs[i]))
    return {"grid": list(grid),
            "val_acc": [r.final_test_acc for r in runs] if data.classification else None,
            "val_loss": [r.final_test_loss for r in runs],
            "chosen_lr": grid[best]}
