"""What a comparison trains on: a :class:`Task` is a model factory, data with fixed train /
validation / test splits, a training loss and a test metric.

Build your own with :meth:`Task.from_tensors` (data that fits in tensors) or
:meth:`Task.from_datasets` (any ``torch.utils.data.Dataset``)::

    def make_task():
        return Task.from_tensors("my-task", lambda: nn.Linear(20, 3),
                                 (x_train, y_train), (x_test, y_test), classification=True)

and run it with ``optforge compare --task my_tasks.py:make_task`` (a file) or
``--task my_pkg.tasks:make_task`` (a module). The built-in tasks (``linear``, ``digits``,
``mnist1d``, ``text``) are Tasks too (:mod:`.builtin`, :mod:`.text`).

Without an explicit validation split, one is carved out of the training data (20 %, per class
for classification, fixed seed). Every run trains on the rest: validation data is never
trained on, so ``--tune`` and the time to a validation target use it, and the test split is
evaluated once, at the end of each run.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["Data", "Examples", "Metric", "Task", "get_task", "load_task"]

SPLIT_SEED = 0          # the one seed behind every fixed split
VAL_FRACTION = 0.2      # of the training data, when no validation split is given


@dataclass(frozen=True)
class Metric:
    """A test metric: ``fn(output, target)`` gives one value per example (a 1-D tensor); the
    metric of a split is their mean. ``resolution_per_example``: the value one example adds
    or takes away from the mean times the split size (100 for accuracy in %), or None for a
    continuous metric."""

    name: str
    fn: Callable[[Tensor, Tensor], Tensor]
    higher_is_better: bool = True
    resolution_per_example: float | None = None


def _correct_percent(out: Tensor, y: Tensor) -> Tensor:
    return (out.argmax(-1) == y).to(torch.float32) * 100


def _squared_error(out: Tensor, y: Tensor) -> Tensor:
    return (out - y).pow(2).reshape(len(out), -1).mean(1)


ACCURACY = Metric("accuracy %", _correct_percent, True, 100.0)
MSE = Metric("mse", _squared_error, False)


class Examples:
    """One split: ``len()`` examples, fetched as a batch ``(inputs, targets)`` by index."""

    def __init__(self, x: Tensor | None = None, y: Tensor | None = None,
                 dataset: torch.utils.data.Dataset | None = None,
                 index: Tensor | None = None) -> None:
        self.x, self.y, self.dataset = x, y, dataset
        self.index = index          # rows of x / dataset that belong to this split (None: all)

    def __len__(self) -> int:
        if self.index is not None:
            return len(self.index)
        return len(self.x) if self.x is not None else len(self.dataset)  # type: ignore[arg-type]

    def subset(self, rows: Tensor) -> Examples:
        index = rows if self.index is None else self.index[rows]
        return Examples(self.x, self.y, self.dataset, index)

    def batch(self, rows: Tensor) -> tuple[Any, Tensor]:
        index = rows if self.index is None else self.index[rows]
        if self.x is not None:
            return self.x[index], self.y[index]
        items = [self.dataset[int(i)] for i in index]  # type: ignore[index]
        return torch.utils.data.default_collate(items)

    def targets(self) -> Tensor | None:
        """All targets (for a stratified split), or None when they are not one tensor."""
        if self.y is not None:
            return self.y if self.index is None else self.y[self.index]
        return None

    def sha256(self, h: Any) -> None:
        """Feed every example's bytes, in order, to the hash ``h``."""
        for start in range(0, len(self), 4096):
            rows = torch.arange(start, min(start + 4096, len(self)))
            for t in _tensors(self.batch(rows)):
                h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())   # any dtype


def _tensors(obj: Any) -> list[Tensor]:
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj) for t in _tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return [torch.as_tensor(np.asarray(obj))]


@dataclass(frozen=True)
class Data:
    """The fixed splits of a task: ``train`` (what every run trains on), ``val``, ``test``."""

    train: Examples
    val: Examples
    test: Examples

    def sha256(self) -> str:
        h = hashlib.sha256()
        for split in (self.train, self.val, self.test):
            h.update(str(len(split)).encode())
            split.sha256(h)
        return h.hexdigest()


def _split_off_val(train: Examples, stratify: bool) -> tuple[Examples, Examples]:
    """(train minus validation, validation): VAL_FRACTION of ``train``, per class when
    ``stratify`` and the targets are one integer tensor."""
    n = len(train)
    rng = np.random.default_rng(SPLIT_SEED + 1)
    y = train.targets()
    if stratify and y is not None and y.dim() == 1 and not y.is_floating_point():
        labels = y.cpu().numpy()
        held = []
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            held.append(idx[: int(round(VAL_FRACTION * len(idx)))])
        val = np.sort(np.concatenate(held))
    else:
        val = np.sort(rng.permutation(n)[: int(round(VAL_FRACTION * n))])
    keep = np.setdiff1d(np.arange(n), val)
    if len(val) == 0 or len(keep) == 0:
        raise ValueError(f"the training split has {n} example(s): too few to carve out a validation split")
    return train.subset(torch.as_tensor(keep)), train.subset(torch.as_tensor(val))


def _tensor_pair(pair: Any, what: str) -> tuple[Tensor, Tensor]:
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
        raise TypeError(f"{what} must be a pair (inputs, targets), got {type(pair).__name__}")
    x, y = (torch.as_tensor(v) for v in pair)
    if len(x) != len(y):
        raise ValueError(f"{what}: {len(x)} inputs but {len(y)} targets")
    if len(x) == 0:
        raise ValueError(f"{what} is empty")
    return x, y


def _cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


@dataclass(frozen=True)
class Task:
    """A model factory, data (loaded when first needed), a loss and a metric, and the defaults
    a comparison on it starts from. Build one with :meth:`from_tensors` or :meth:`from_datasets`.
    """

    name: str
    model_fn: Callable[[], nn.Module]       # called after seeding: a fresh model per run
    load: Callable[[], Data]
    loss: Callable[[Any, Tensor], Tensor]   # (model output, targets) -> scalar training loss
    metric: Metric
    steps: int = 1000
    batch_size: int = 64
    target: float | None = None             # validation metric for "steps to target"
    eval_batch_size: int = 1024
    description: str = ""
    model_description: str = ""
    default_optimizers: str | None = None   # a comma list for --optimizers when not given
    source: dict[str, Any] = field(default_factory=dict)   # where a user's task came from

    @classmethod
    def from_tensors(cls, name: str, model_fn: Callable[[], nn.Module], train: Sequence[Tensor],
                     test: Sequence[Tensor], *, val: Sequence[Tensor] | None = None,
                     classification: bool = True, loss: Callable[[Any, Tensor], Tensor] | None = None,
                     metric: Metric | None = None, **defaults: Any) -> Task:
        """A task on ``(inputs, targets)`` tensor pairs. ``classification``: targets are class
        indices, the loss is cross-entropy and the metric accuracy; otherwise MSE for both.
        ``loss`` / ``metric`` replace those. ``defaults``: ``steps``, ``batch_size``,
        ``target``, ``eval_batch_size``, ``description``, ``model_description``."""
        pairs = [_tensor_pair(train, "train"), _tensor_pair(test, "test")]
        if val is not None:
            pairs.append(_tensor_pair(val, "val"))
        return tensor_task(name, model_fn, lambda: pairs, classification, loss, metric, **defaults)

    @classmethod
    def from_datasets(cls, name: str, model_fn: Callable[[], nn.Module],
                      train: torch.utils.data.Dataset, test: torch.utils.data.Dataset, *,
                      val: torch.utils.data.Dataset | None = None, classification: bool = True,
                      loss: Callable[[Any, Tensor], Tensor] | None = None,
                      metric: Metric | None = None, **defaults: Any) -> Task:
        """A task on map-style ``torch.utils.data.Dataset`` s whose items are ``(input,
        target)``; batches are put together with ``default_collate``. Otherwise as
        :meth:`from_tensors` (the validation split is random, not per class, unless given)."""
        for ds, what in ((train, "train"), (test, "test"), (val, "val")):
            if ds is None:
                continue
            if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
                raise TypeError(f"{what} must be a map-style Dataset (with __getitem__ and __len__), "
                                f"got {type(ds).__name__}")
            if len(ds) == 0:
                raise ValueError(f"{what} is empty")

        def load() -> Data:
            tr = Examples(dataset=train)
            va = Examples(dataset=val) if val is not None else None
            if va is None:
                tr, va = _split_off_val(tr, False)
            return Data(tr, va, Examples(dataset=test))

        return cls._make(name, model_fn, load, classification, loss, metric, defaults)

    @classmethod
    def _make(cls, name, model_fn, load, classification, loss, metric, defaults) -> Task:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"a task needs a name, got {name!r}")
        if not callable(model_fn):
            raise TypeError(f"model_fn must be callable (it builds a fresh nn.Module), got {model_fn!r}")
        unknown = set(defaults) - {"steps", "batch_size", "target", "eval_batch_size", "description",
                                   "model_description", "default_optimizers"}
        if unknown:
            raise TypeError(f"unknown Task option(s) {sorted(unknown)}")
        for key in ("steps", "batch_size", "eval_batch_size"):
            if key in defaults and not (isinstance(defaults[key], int) and defaults[key] >= 1):
                raise ValueError(f"{key} must be a positive integer, got {defaults[key]!r}")
        if metric is not None and not isinstance(metric, Metric):
            raise TypeError(f"metric must be an optforge.compare.Metric, got {type(metric).__name__}")
        return cls(name.strip(), model_fn, _cached(load),
                   loss or (_cross_entropy if classification else nn.functional.mse_loss),
                   metric or (ACCURACY if classification else MSE), **defaults)


@dataclass(frozen=True)
class ModelSpec:
    """A built-in task's model: its factory, a description, its validation target."""

    build: Callable[[], nn.Module]
    description: str
    target: float | None


def tensor_task(name: str, model_fn: Callable[[], nn.Module],
                load_pairs: Callable[[], Sequence[tuple[Tensor, Tensor]]], classification: bool,
                loss: Callable[[Any, Tensor], Tensor] | None = None, metric: Metric | None = None,
                **defaults: Any) -> Task:
    """A tensor task whose ``load_pairs()`` (called on first use) gives ``[train, test]`` or
    ``[train, test, val]`` as ``(inputs, targets)`` pairs."""

    def load() -> Data:
        pairs = load_pairs()
        tr, te = Examples(*pairs[0]), Examples(*pairs[1])
        if len(pairs) == 2:
            tr, va = _split_off_val(tr, classification)
        else:
            va = Examples(*pairs[2])
        return Data(tr, va, te)

    return Task._make(name, model_fn, load, classification, loss, metric, defaults)


def _cached(load: Callable[[], Data]) -> Callable[[], Data]:
    box: list[Data] = []

    def cached() -> Data:
        if not box:
            box.append(load())
        return box[0]

    return cached


# ---- finding a task by name, file or module ------------------------------------------------
def load_task(spec: str) -> Task:
    """``path/to/file.py:function`` or ``package.module:function``: call the function (no
    arguments) and return the :class:`Task` it builds."""
    where, _, fn_name = spec.rpartition(":")
    if not where or not fn_name.isidentifier():
        raise ValueError(f"--task {spec!r}: expected a built-in name, FILE.py:FUNCTION or MODULE:FUNCTION")
    module = import_user_code(where, f"--task {spec!r}")
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"--task {spec!r}: {where} has no function {fn_name!r}")
    task = fn()
    if not isinstance(task, Task):
        raise TypeError(f"--task {spec!r}: {fn_name}() returned {type(task).__name__}, not an "
                        f"optforge.compare.Task (build one with Task.from_tensors or Task.from_datasets)")
    source: dict[str, Any] = {"spec": spec}
    path = getattr(module, "__file__", None)
    if path:
        source["file"] = str(Path(path).resolve())
        source["file_sha256"] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return replace(task, source=source)


def import_user_code(where: str, what: str) -> Any:
    """Import a ``.py`` file (once per path) or a module (the current directory on the path,
    as ``python -m`` has it). ValueError naming ``what`` when it cannot be found."""
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"{what}: no file {where!r}")
        key = "optforge_user_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
        if key in sys.modules:
            return sys.modules[key]
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[key] = module
        try:
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        except BaseException:
            del sys.modules[key]
            raise
        return module
    added = "" not in sys.path and str(Path.cwd()) not in sys.path
    if added:
        sys.path.insert(0, str(Path.cwd()))
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as e:
        if e.name and where.split(".")[0] == e.name.split(".")[0]:
            raise ValueError(f"{what}: no module named {where!r}") from None
        raise
    finally:
        if added:
            sys.path.remove(str(Path.cwd()))


def get_task(spec: str, model: str | None = None) -> Task:
    """A built-in task (with ``model``, or its default model) or a user's ``FILE:FN`` /
    ``MODULE:FN`` task. ValueError for an unknown name or a model that does not fit."""
    from .builtin import builtin_task

    if ":" in spec:
        if model is not None:
            raise ValueError(f"--model applies to built-in tasks; --task {spec!r} builds its own model")
        return load_task(spec)
    return builtin_task(spec, model)

