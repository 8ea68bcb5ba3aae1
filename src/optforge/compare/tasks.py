"""Compare tasks: a data set that ships in a package, its fixed splits, and its models.

A :class:`Task` knows how to load its data (:class:`Dataset`: train / validation / test
tensors, always the same split) and how to build each of its models. Nothing is downloaded:

- ``linear``: the seed toy, y = 5x + 10, fitted by ``Linear(1, 1)`` with MSE.
- ``digits``: scikit-learn's 8x8 ``load_digits`` (1,797 images), an MLP or a small CNN.
- ``mnist1d``: MNIST-1D generated locally (``make_dataset(get_dataset_args())``), with the
  paper's logistic regression, MLP and CNN (its ``notebooks/models.py``).

The validation split is carved out of the training split (stratified, fixed seed); ``--tune``
trains on the rest of the training split and scores on it, so the test split is never seen
while choosing an lr.
"""

from __future__ import annotations

import difflib
import functools
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["Dataset", "Task", "TASKS", "get_task"]

SPLIT_SEED = 0          # the one seed behind every fixed split
VAL_FRACTION = 0.2      # of the training split, for --tune


@dataclass(frozen=True)
class Dataset:
    """Fixed splits of one task, as float32 inputs and int64 (or float32) targets."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    classification: bool
    val_index: Tensor            # rows of the training split that form x_val / y_val

    def for_tuning(self) -> Dataset:
        """Train on the training split minus validation; evaluate on validation."""
        keep = torch.ones(len(self.x_train), dtype=torch.bool)
        keep[self.val_index] = False
        empty = self.val_index[:0]
        return Dataset(self.x_train[keep], self.y_train[keep], self.x_val, self.y_val,
                       self.x_val, self.y_val, self.classification, empty)


def _stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out): ``fraction`` of each class held out, fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        held.append(idx[: int(round(fraction * len(idx)))])
    held_out = np.sort(np.concatenate(held))
    kept = np.setdiff1d(np.arange(len(y)), held_out)
    return kept, held_out


def _make_dataset(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                  classification: bool) -> Dataset:
    if classification:
        _, val = _stratified_split(y_train, VAL_FRACTION, SPLIT_SEED + 1)
    else:
        rng = np.random.default_rng(SPLIT_SEED + 1)
        val = np.sort(rng.permutation(len(y_train))[: int(round(VAL_FRACTION * len(y_train)))])
    ytype = torch.int64 if classification else torch.float32
    xt = torch.as_tensor(x_train, dtype=torch.float32)
    yt = torch.as_tensor(y_train, dtype=ytype)
    vi = torch.as_tensor(val, dtype=torch.int64)
    return Dataset(xt, yt, xt[vi], yt[vi], torch.as_tensor(x_test, dtype=torch.float32),
                   torch.as_tensor(y_test, dtype=ytype), classification, vi)


# ---- data loaders (cached per process) --------------------------------------------------------
@functools.cache
def load_linear() -> Dataset:
    """y = 5x + 10 on x ~ U(-1, 1): 1,000 train points, 200 test points, no noise."""
    g = torch.Generator().manual_seed(SPLIT_SEED)
    x = torch.rand(1200, 1, generator=g) * 2 - 1
    y = 5 * x + 10
    return _make_dataset(x[:1000].numpy(), y[:1000].numpy(), x[1000:].numpy(), y[1000:].numpy(),
                         classification=False)


@functools.cache
def load_digits() -> Dataset:
    """scikit-learn's digits, pixels scaled to [0, 1]; a stratified 80/20 train/test split
    (1,438 / 359 images; 287 of the training images form the validation split)."""
    from sklearn.datasets import load_digits as sk_load_digits

    x, y = sk_load_digits(return_X_y=True)
    x = x.astype(np.float32) / 16.0
    train, test = _stratified_split(y, 0.2, SPLIT_SEED)
    return _make_dataset(x[train], y[train], x[test], y[test], classification=True)


def cache_dir() -> Path:
    """``$OPTFORGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/optforge``, else ``~/.cache/optforge``."""
    if os.environ.get("OPTFORGE_CACHE_DIR"):
        return Path(os.environ["OPTFORGE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "optforge"


@functools.cache
def load_mnist1d() -> Dataset:
    """MNIST-1D's standard split (4,000 train, 1,000 test), generated locally.

    Generating takes a few seconds, so the arrays are cached as an ``.npz`` under
    :func:`cache_dir` (keyed by the generator's arguments); a cache that cannot be written
    or read is simply regenerated.
    """
    from mnist1d.data import get_dataset_args

    args = get_dataset_args(as_dict=True)
    key = {k: v for k, v in args.items() if k != "url"}
    path = cache_dir() / f"mnist1d-{_stable_tag(key)}.npz"
    arrays = None
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in ("x", "y", "x_test", "y_test")}
    except (OSError, ValueError, KeyError):
        arrays = None
    if arrays is None:
        arrays = _generate_mnist1d()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
        except OSError:
            pass
    return _make_dataset(arrays["x"], arrays["y"], arrays["x_test"], arrays["y_test"],
                         classification=True)


def _stable_tag(key: dict[str, Any]) -> str:
    import hashlib

    return hashlib.sha256(repr(sorted(key.items())).encode()).hexdigest()[:12]


def _generate_mnist1d() -> dict[str, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    np_state, py_state = np.random.get_state(), random.getstate()   # make_dataset reseeds both
    try:
        d = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {"x": d["x"].astype(np.float32), "y": d["y"].astype(np.int64),
            "x_test": d["x_test"].astype(np.float32), "y_test": d["y_test"].astype(np.int64)}


# ---- models ----------------------------------------------------------------------------------
class DigitsCNN(nn.Module):
    """Two 3x3 convolutions (16, 32 channels), a 2x2 max-pool and a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.linear = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = x.view(-1, 1, 8, 8)
        h = self.conv1(h).relu()
        h = nn.functional.max_pool2d(self.conv2(h).relu(), 2)
        return self.linear(h.flatten(1))


class ResidualMLP(nn.Module):
    """MNIST-1D's ``MLPBase``: two hidden layers with a residual connection on the second.

    ``hidden=256`` is the paper's ``get_model_args()['hidden_size']`` (its ``train.py``)."""

    def __init__(self, n_in: int, n_out: int, hidden: int = 256) -> None:
        super().__init__()
        self.linear1 = nn.Linear(n_in, hidden)
        self.linear2 = nn.Linear(hidden, hidden)
        self.linear3 = nn.Linear(hidden, n_out)

    def forward(self, x: Tensor) -> Tensor:
        h = self.linear1(x).relu()
        h = h + self.linear2(h).relu()
        return self.linear3(h)


class MNIST1DCNN(nn.Module):
    """MNIST-1D's ``ConvBase``: three strided 1-D convolutions (25 channels) and a linear layer."""

    def __init__(self, channels: int = 25, n_out: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.linear = nn.Linear(channels * 5, n_out)   # 40 -> 19 -> 10 -> 5 positions

    def forward(self, x: Tensor) -> Tensor:
        h = x.view(-1, 1, x.shape[-1])
        h = self.conv1(h).relu()
        h = self.conv2(h).relu()
        h = self.conv3(h).relu()
        return self.linear(h.flatten(1))


def _digits_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


# ---- the task table --------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """A data set with its models and the defaults a comparison on it starts from."""

    name: str
    description: str
    load: Callable[[], Dataset]
    models: dict[str, Callable[[], nn.Module]]
    default_model: str
    steps: int                  # default --steps
    batch_size: int             # default --batch-size
    target_loss: float          # default --target-loss (train loss)
    model_help: dict[str, str] = field(default_factory=dict)

    def build_model(self, model: str) -> nn.Module:
        return self.models[model]()

    def check_model(self, model: str | None) -> str:
        """The model name to use (the default when ``None``); ValueError when unknown."""
        if model is None:
            return self.default_model
        key = model.strip().lower()
        if key not in self.models:
            raise ValueError(f"unknown model {model!r} for task {self.name!r} "
                             f"(choose from: {', '.join(self.models)})")
        return key


TASKS: dict[str, Task] = {
    t.name: t for t in (
        Task("linear", "y = 5x + 10, Linear(1, 1), MSE (the seed toy)", load_linear,
             {"linear": lambda: nn.Linear(1, 1)}, "linear", steps=300, batch_size=32,
             target_loss=1e-3, model_help={"linear": "Linear(1, 1)"}),
        Task("digits", "scikit-learn 8x8 digits (1,438 train / 359 test)", load_digits,
             {"mlp": _digits_mlp, "cnn": DigitsCNN}, "mlp", steps=2000, batch_size=64,
             target_loss=0.05,
             model_help={"mlp": "64-128-10 ReLU MLP", "cnn": "2 conv layers + max-pool + linear"}),
        Task("mnist1d", "MNIST-1D (4,000 train / 1,000 test), generated locally", load_mnist1d,
             {"logistic": lambda: nn.Linear(40, 10), "mlp": lambda: ResidualMLP(40, 10),
              "cnn": MNIST1DCNN}, "cnn", steps=8000, batch_size=100, target_loss=0.3,
             model_help={"logistic": "Linear(40, 10)", "mlp": "the paper's MLPBase (hidden 256)",
                         "cnn": "the paper's ConvBase (25 channels)"}),
    )
}


def get_task(name: str) -> Task:
    """The task called ``name``; ValueError naming the choices when unknown."""
    key = name.strip().lower()
    if key in TASKS:
        return TASKS[key]
    close = difflib.get_close_matches(key, sorted(TASKS), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown task {name!r}{hint} (choose from: {', '.join(TASKS)})")
