"""The training loop of one compare run.

A run is deterministic for its seed: ``torch.manual_seed(seed)`` before the model is built
and a ``torch.Generator`` seeded with ``seed`` for the data order (a fresh permutation of the
training split per epoch, the last incomplete batch dropped). The optimizer is built with
:func:`optforge.create_optimizer` on the model (no weight decay on biases and norms; Muon's
matrix / AdamW split), and ``schedule`` (one for every optimizer) multiplies its lr. The loop
records

- ``train_loss``: the mean minibatch loss over each window of ``log_every`` steps,
- ``val_metric`` / ``val_loss``: on the validation split at step 0, every ``eval_every`` steps
  and at the last step; ``steps_to_target`` / ``seconds_to_target``: the first evaluation
  whose validation metric reaches ``target`` (seconds: training time, evaluation excluded),
- the test metric once, at the end, per test example (``test_values``) and as their mean,
- the wall time of the first step (state allocation, compilation) and the median of the
  others, whole step and ``opt.step()`` alone,
- optimizer state bytes per parameter (every tensor in its ``state_dict``),
- the hyperparameters the optimizer resolved (its defaults and every param group's values).

A tuning trial (``split="val"``) never touches the test split. A non-finite loss stops the
run; it is marked ``diverged`` and its final metrics are NaN.
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
from .tasks import Data, Examples, Task

__all__ = ["RunResult", "Settings", "evaluate", "jsonable", "state_bytes_per_param", "train_run"]

SCHEDULES = ("constant", "warmup_cosine")
DEFAULT_WARMUP = 0.05        # fraction of the steps, for warmup_cosine when not tuned


@dataclass(frozen=True)
class Settings:
    """What every run of one comparison shares."""

    steps: int
    batch_size: int
    log_every: int
    eval_every: int
    target: float | None
    schedule: str = "constant"


@dataclass
class RunResult:
    optimizer: str
    seed: int
    split: str                                  # "test", or "val" for a tuning trial
    hyperparameters: dict[str, Any]             # what the comparison set: lr, options, warmup
    resolved: dict[str, Any] = field(default_factory=dict)     # the optimizer's defaults
    param_groups: list[dict[str, Any]] = field(default_factory=list)
    schedule: dict[str, Any] = field(default_factory=dict)
    steps_done: int = 0
    diverged: bool = False
    train_loss: dict[str, list] = field(default_factory=lambda: {"step": [], "value": []})
    val_metric: dict[str, list] = field(default_factory=lambda: {"step": [], "value": []})
    val_loss: dict[str, list] = field(default_factory=lambda: {"step": [], "value": []})
    final_train_loss: float = math.nan
    final_val_metric: float = math.nan
    final_val_loss: float = math.nan
    final_test_metric: float | None = None
    final_test_loss: float | None = None
    test_values: list[float] | None = None     # the metric per test example
    steps_to_target: int | None = None
    seconds_to_target: float | None = None
    first_step_s: float = math.nan              # warm-up: state allocation, compilation
    step_time_ms: float = math.nan              # median of the other steps, whole step
    opt_step_time_ms: float = math.nan          # median of the other steps, opt.step() alone
    train_time_s: float = 0.0                   # every step, evaluation excluded
    wall_time_s: float = 0.0
    state_bytes_per_param: float = math.nan

    def to_json(self) -> dict[str, Any]:
        return jsonable(asdict(self))


def jsonable(obj: Any) -> Any:
    """Tuples as lists, tensors and other objects as numbers or their repr, keys as strings."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return obj
    if torch.is_tensor(obj) and obj.numel() == 1:
        return obj.item()
    if isinstance(obj, torch.dtype):
        return str(obj)
    return repr(obj)


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


def _to(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, split: Examples, opt: torch.optim.Optimizer | None = None,
             device: torch.device | None = None) -> tuple[float, Tensor]:
    """(mean loss, the metric per example) on a whole split, in batches of the task's
    ``eval_batch_size``. An optimizer with ``eval()`` and ``train()`` (Schedule-Free: the
    parameters to evaluate are x, not the training point y) is switched to eval for it and back."""
    switch = opt is not None and all(callable(getattr(opt, m, None)) for m in ("eval", "train"))
    device = device or torch.device("cpu")
    model.eval()
    if switch:
        opt.eval()
    try:
        loss_sum, values = 0.0, []
        n = len(split)
        for start in range(0, n, task.eval_batch_size):
            rows = torch.arange(start, min(start + task.eval_batch_size, n))
            x, y = _to(split.batch(rows), device)
            out = model(x)
            loss_sum += task.loss(out, y).item() * len(rows)
            values.append(task.metric.fn(out, y).detach().float().reshape(-1).cpu())
        return loss_sum / n, torch.cat(values)
    finally:
        model.train()
        if switch:
            opt.train()


def _groups_json(opt: torch.optim.Optimizer) -> list[dict[str, Any]]:
    inner = getattr(opt, "optimizer", opt)                     # Lookahead's base optimizer
    return [jsonable({**{k: v for k, v in g.items() if k != "params"},
                      "n_params": sum(p.numel() for p in g["params"])}) for g in inner.param_groups]


def _scheduler(opt: torch.optim.Optimizer, settings: Settings, warmup: float):
    if settings.schedule == "constant":
        return None, {"name": "constant"}
    from ..schedules import warmup_cosine

    steps = round(warmup * settings.steps)
    return (warmup_cosine(opt, warmup_steps=steps, total_steps=settings.steps),
            {"name": "warmup_cosine", "warmup_fraction": warmup, "warmup_steps": steps,
             "total_steps": settings.steps, "min_lr": 0.0})


def train_run(task: Task, data: Data, optimizer: str, hyperparameters: dict[str, Any], seed: int,
              settings: Settings, *, split: str = "test",
              progress: Callable[[int], None] | None = None) -> RunResult:
    """Train ``task``'s model on ``data.train`` with one optimizer, its hyperparameters (``lr``,
    constructor options, and ``schedule_warmup``: the schedule's warmup fraction) and one seed.

    ``progress(n)`` is called after every ``log_every`` steps with the number of steps done
    since its last call (for a progress bar).
    """
    hp = dict(hyperparameters)
    warmup = hp.pop("schedule_warmup", DEFAULT_WARMUP)
    torch.manual_seed(seed)
    model = task.model_fn()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = create_optimizer(model, optimizer, **hp)
    res = RunResult(optimizer, seed, split, dict(hyperparameters),
                    resolved=jsonable(dict(getattr(opt, "defaults", {}))), param_groups=_groups_json(opt))
    sched, res.schedule = _scheduler(opt, settings, warmup)
    gen = torch.Generator().manual_seed(seed)
    higher = task.metric.higher_is_better
    train_time = 0.0

    def record_eval(step: int) -> None:
        loss, values = evaluate(model, task, data.val, opt, device)
        metric = values.mean().item()
        for curve, v in ((res.val_loss, loss), (res.val_metric, metric)):
            curve["step"].append(step)
            curve["value"].append(v)
        if (res.steps_to_target is None and settings.target is not None and step > 0
                and (metric >= settings.target if higher else metric <= settings.target)):
            res.steps_to_target, res.seconds_to_target = step, train_time

    n = len(data.train)
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
        x, y = _to(data.train.batch(perm[pos:pos + bs]), device)
        pos += bs
        t0 = time.perf_counter()
        loss = task.loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        if sched is not None:
            sched.step()
        value = loss.item()
        t2 = time.perf_counter()
        step_times.append(t2 - t0)
        opt_times.append(t2 - t1)
        train_time += t2 - t0
        res.steps_done = step
        if not math.isfinite(value):
            res.diverged = True
            break
        window += value
        window_n += 1
        if step % settings.log_every == 0 or step == settings.steps:
            res.train_loss["step"].append(step)
            res.train_loss["value"].append(window / window_n)
            window, window_n = 0.0, 0
            if progress is not None:
                progress(step - reported)
                reported = step
        if step % settings.eval_every == 0 or step == settings.steps:
            record_eval(step)
    if progress is not None and reported < settings.steps:
        progress(settings.steps - reported)       # a diverged run still fills its share
    res.train_time_s = train_time
    res.first_step_s = step_times[0]
    if len(step_times) > 1:
        res.step_time_ms = statistics.median(step_times[1:]) * 1e3
        res.opt_step_time_ms = statistics.median(opt_times[1:]) * 1e3
    res.state_bytes_per_param = state_bytes_per_param(opt, n_params)
    if not res.diverged and res.train_loss["value"]:
        res.final_train_loss = res.train_loss["value"][-1]
        res.final_val_metric = res.val_metric["value"][-1]
        res.final_val_loss = res.val_loss["value"][-1]
        if split == "test":
            loss, values = evaluate(model, task, data.test, opt, device)
            res.final_test_loss, res.final_test_metric = loss, values.mean().item()
            res.test_values = values.tolist()
    if not (res.diverged or all(map(math.isfinite, (res.final_val_metric, res.final_val_loss)))):
        res.diverged = True
    if res.diverged:
        res.final_train_loss = res.final_val_metric = res.final_val_loss = math.nan
        res.final_test_metric = res.final_test_loss = res.test_values = None
        res.steps_to_target = res.seconds_to_target = None
    res.wall_time_s = time.perf_counter() - start
    return res
