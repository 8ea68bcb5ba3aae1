r"""Learning-rate schedules: real ``torch.optim.lr_scheduler.LRScheduler`` subclasses.

They work with any ``torch.optim.Optimizer``, save and load with ``state_dict()``, compose in
``torch.optim.lr_scheduler.SequentialLR`` and ``ChainedScheduler``, and are called once per
optimizer step (``opt.step(); sched.step()``)::

    sched = optforge.schedules.warmup_cosine(opt, warmup_steps=500, total_steps=10_000)

Conventions shared by every schedule here:

- ``t`` is the scheduler's step count (``last_epoch``): 0 right after construction, so the
  lr at ``t`` is the lr the ``(t + 1)``-th ``optimizer.step()`` uses.
- ``b`` is a group's base lr (its ``initial_lr``: the group lr when the scheduler was built).
- ``s`` is the group's ``lr_scale`` (1 when absent; see below). Absolute lrs given to a
  schedule (``min_lr``) are multiplied by ``s``, so every group follows ``s`` times the same
  global schedule.
- Each docstring gives the closed form :math:`\mathrm{lr}_t`. Run alone, a schedule sets
  exactly that value (bit for bit). Chained with multiplicative schedulers, it multiplies
  whatever else changed the group lr since its previous step, as torch's own chainable
  schedulers do: :math:`\mathrm{lr}_t = \mathrm{lr}_{\text{group}}\cdot
  \mathrm{lr}_t^{\text{closed}} / \mathrm{lr}_{t-1}^{\text{closed}}` (taken as the closed
  form when the previous value was 0).

**Layer-wise lr scale.** :func:`optforge.create_optimizer` with ``layer_decay`` (and
:func:`optforge.param_groups_layer_decay` with ``lr=``) store the scale as
``group["lr_scale"]`` *and* bake it into the group lr (``group["lr"] = lr * lr_scale``), so the
lr in a group is always the lr the optimizer applies. Hence every scheduler that works
relative to each group's own lr honours the scale with nothing to do: these schedules,
torch's ``LambdaLR``, ``StepLR``, ``MultiStepLR``, ``ExponentialLR``, ``LinearLR``,
``PolynomialLR``, ``CosineAnnealingLR`` (with ``eta_min=0``), ``SequentialLR``,
``ReduceLROnPlateau``, and no scheduler at all. Schedulers that *set absolute* lrs
(``OneCycleLR``, ``CyclicLR``, a loop that writes the same lr into every group) need the
scale applied: :func:`create_scheduler` expands their scalar lrs per group for you, and
:func:`set_lr` is the helper for hand-written loops (``set_lr(opt, lr)`` writes
``lr * lr_scale`` into each group). (timm's schedulers multiply ``lr_scale`` in themselves;
with optforge's baked groups that would apply it twice — use these schedules instead.)
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim import lr_scheduler as _torch_sched
from torch.optim.lr_scheduler import LRScheduler

__all__ = [
    "DECAY_SHAPES",
    "LinearWarmupLR",
    "NoamLR",
    "WarmupCosineLR",
    "WarmupStableDecayLR",
    "create_scheduler",
    "linear_warmup",
    "list_schedulers",
    "noam",
    "set_lr",
    "warmup_cosine",
    "wsd",
]

DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


def set_lr(optimizer: Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr * group.get("lr_scale", 1.0)``.

    Use it wherever code writes one lr into all groups (a hand-written schedule, or after a
    scheduler that sets absolute lrs), so layer-wise scales survive; and once, right after
    building a ``torch.optim`` optimizer from :func:`optforge.param_groups_layer_decay` groups
    made without ``lr=``.
    """
    for group in optimizer.param_groups:
        value = lr * float(group.get("lr_scale", 1.0))
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)
        else:
            group["lr"] = value


# ---- validation helpers -------------------------------------------------------------------
def _int_at_least(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"invalid {name}={value!r}: expected an integer >= {low}")
    return int(value)


def _in_unit(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"invalid {name}={value!r}: expected a number in [0, 1]")
    return float(value)


def _floor(min_lr: float | None, min_ratio: float | None) -> tuple[float | None, float]:
    if min_lr is not None and min_ratio is not None:
        raise ValueError("give min_lr (an absolute lr) or min_ratio (a fraction of the base lr), not both")
    if min_lr is not None:
        if isinstance(min_lr, bool) or not isinstance(min_lr, numbers.Real) or not 0 <= min_lr < math.inf:
            raise ValueError(f"invalid min_lr={min_lr!r}: expected a finite number >= 0")
        return float(min_lr), 0.0
    return None, _in_unit("min_ratio", 0.0 if min_ratio is None else min_ratio)


class _ClosedFormLR(LRScheduler):
    """A schedule given by its closed form ``lr_at(t, base, scale)``; see the module docstring."""

    def lr_at(self, t: int, base: float, scale: float) -> float:
        raise NotImplementedError

    def _closed(self, t: int) -> list[float]:
        return [self.lr_at(t, float(b), float(g.get("lr_scale", 1.0)))
                for b, g in zip(self.base_lrs, self.optimizer.param_groups)]

    def _get_closed_form_lr(self) -> list[float]:
        # torch uses it for step(epoch) and at SequentialLR milestones.
        return self._closed(self.last_epoch)

    def get_lr(self) -> list[float]:
        t = self.last_epoch
        current = self._closed(t)
        previous = self._closed(t - 1) if t > 0 else [float(b) for b in self.base_lrs]
        out = []
        for group, cur, prev in zip(self.optimizer.param_groups, current, previous):
            # Alone, the group lr is exactly `prev`, so the factor is exactly 1.0.
            factor = float(group["lr"]) / prev if prev != 0 else 1.0
            out.append(factor * cur)
        return out


def _warmup(t: int, warmup_steps: int, start_factor: float) -> float:
    return start_factor + (1.0 - start_factor) * t / warmup_steps


class LinearWarmupLR(_ClosedFormLR):
    r"""Linear warmup to the base lr, then constant.

    .. math::
        \mathrm{lr}_t = b\left(f_0 + (1 - f_0)\,\frac{t}{W}\right) \ (t < W), \qquad
        \mathrm{lr}_t = b \ (t \ge W)

    with :math:`W` = ``warmup_steps`` and :math:`f_0` = ``start_factor`` (0 by default, as
    Hugging Face's warmups: the first step runs at lr 0). Put it first in a
    ``SequentialLR`` to warm up any other schedule.
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int, start_factor: float = 0.0,
                 last_epoch: int = -1) -> None:
        self.warmup_steps = _int_at_least("warmup_steps", warmup_steps, 0)
        self.start_factor = _in_unit("start_factor", start_factor)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, t: int, base: float, scale: float) -> float:
        if t < self.warmup_steps:
            return base * _warmup(t, self.warmup_steps, self.start_factor)
        return base


class WarmupCosineLR(_ClosedFormLR):
    r"""Linear warmup, then half-cosine decay to a floor (Loshchilov & Hutter's SGDR without
    restarts, with the warmup of Goyal et al.).

    .. math::
        \mathrm{lr}_t = \begin{cases}
            b\left(f_0 + (1 - f_0)\,t / W\right) & t < W \\
            m + (b - m)\,\tfrac12\left(1 + \cos\left(\pi\,\frac{t - W}{T - W}\right)\right)
                & W \le t < T \\
            m & t \ge T
        \end{cases}

    with :math:`W` = ``warmup_steps``, :math:`T` = ``total_steps``, :math:`f_0` =
    ``start_factor`` and the floor :math:`m = s\cdot` ``min_lr`` (absolute, times the group's
    ``lr_scale`` :math:`s`) or :math:`m = b\cdot` ``min_ratio`` (relative); 0 by default.
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int, total_steps: int,
                 min_lr: float | None = None, min_ratio: float | None = None,
                 start_factor: float = 0.0, last_epoch: int = -1) -> None:
        self.warmup_steps = _int_at_least("warmup_steps", warmup_steps, 0)
        self.total_steps = _int_at_least("total_steps", total_steps, max(1, self.warmup_steps))
        self.min_lr, self.min_ratio = _floor(min_lr, min_ratio)
        self.start_factor = _in_unit("start_factor", start_factor)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, t: int, base: float, scale: float) -> float:
        w, total = self.warmup_steps, self.total_steps
        if t < w:
            return base * _warmup(t, w, self.start_factor)
        m = self.min_lr * scale if self.min_lr is not None else base * self.min_ratio
        if t >= total:
            return m
        return m + (base - m) * 0.5 * (1.0 + math.cos(math.pi * (t - w) / (total - w)))


class NoamLR(_ClosedFormLR):
    r"""The Transformer schedule (Vaswani et al., 2017, eq. 3), with the paper's 1-based step
    number :math:`n = t + 1`:

    .. math::
        \mathrm{lr}_t = b\cdot d_{model}^{-1/2}\cdot\min\left(n^{-1/2},\ n\,W^{-3/2}\right)

    The base lr :math:`b` is a dimensionless factor (1.0 in the paper; build the optimizer with
    ``lr=1.0``); the peak, at :math:`n = W`, is :math:`b/\sqrt{d_{model} W}`. With Adam this
    reproduces :class:`optforge.Noam` exactly.
    """

    def __init__(self, optimizer: Optimizer, d_model: int, warmup_steps: int = 4000,
                 last_epoch: int = -1) -> None:
        if isinstance(d_model, bool) or not isinstance(d_model, numbers.Real) or not d_model > 0:
            raise ValueError(f"invalid d_model={d_model!r}: expected a number > 0")
        self.d_model = d_model
        self.warmup_steps = _int_at_least("warmup_steps", warmup_steps, 1)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, t: int, base: float, scale: float) -> float:
        n = t + 1
        return base * self.d_model ** -0.5 * min(n ** -0.5, n * self.warmup_steps ** -1.5)


class WarmupStableDecayLR(_ClosedFormLR):
    r"""Warmup-stable-decay (WSD; Zhai et al., 2022; Hu et al., 2024 "MiniCPM"; Hägele et
    al., 2024): linear warmup, a constant plateau, and a short final decay to a floor.

    .. math::
        \mathrm{lr}_t = \begin{cases}
            b\left(f_0 + (1 - f_0)\,t / W\right) & t < W \\
            b & W \le t < T - D \\
            m + (b - m)\,\phi\!\left(\frac{t - (T - D)}{D}\right) & T - D \le t < T \\
            m & t \ge T
        \end{cases}

    with :math:`W` = ``warmup_steps``, :math:`T` = ``total_steps``, :math:`D` =
    ``decay_steps`` (or ``round(decay_fraction * T)``; ``decay_fraction`` defaults to 0.2),
    the floor :math:`m` as in :class:`WarmupCosineLR`, and the decay shape :math:`\phi(p)`:
    ``"linear"`` :math:`1 - p`, ``"cosine"`` :math:`\tfrac12(1 + \cos \pi p)`, ``"1-sqrt"``
    :math:`1 - \sqrt{p}` (Hägele et al.'s best).
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int, total_steps: int,
                 decay_steps: int | None = None, decay_fraction: float | None = None,
                 decay_shape: str = "linear", min_lr: float | None = None,
                 min_ratio: float | None = None, start_factor: float = 0.0,
                 last_epoch: int = -1) -> None:
        self.warmup_steps = _int_at_least("warmup_steps", warmup_steps, 0)
        self.total_steps = _int_at_least("total_steps", total_steps, 1)
        if decay_steps is not None and decay_fraction is not None:
            raise ValueError("give decay_steps or decay_fraction, not both")
        if decay_steps is None:
            fraction = _in_unit("decay_fraction", 0.2 if decay_fraction is None else decay_fraction)
            decay_steps = round(fraction * self.total_steps)
        self.decay_steps = _int_at_least("decay_steps", decay_steps, 0)
        if self.warmup_steps + self.decay_steps > self.total_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) + decay_steps ({self.decay_steps}) "
                             f"exceed total_steps ({self.total_steps})")
        if decay_shape not in DECAY_SHAPES:
            close = difflib.get_close_matches(str(decay_shape), DECAY_SHAPES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"invalid decay_shape={decay_shape!r}{hint} (valid: {', '.join(DECAY_SHAPES)})")
        self.decay_shape = decay_shape
        self.min_lr, self.min_ratio = _floor(min_lr, min_ratio)
        self.start_factor = _in_unit("start_factor", start_factor)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, t: int, base: float, scale: float) -> float:
        w, total, d = self.warmup_steps, self.total_steps, self.decay_steps
        if t < w:
            return base * _warmup(t, w, self.start_factor)
        if t < total - d:
            return base
        m = self.min_lr * scale if self.min_lr is not None else base * self.min_ratio
        if t >= total:
            return m
        p = (t - (total - d)) / d
        if self.decay_shape == "linear":
            phi = 1.0 - p
        elif self.decay_shape == "cosine":
            phi = 0.5 * (1.0 + math.cos(math.pi * p))
        else:
            phi = 1.0 - math.sqrt(p)
        return m + (base - m) * phi


# The names a training script writes: sched = schedules.warmup_cosine(opt, ...).
linear_warmup = LinearWarmupLR
warmup_cosine = WarmupCosineLR
noam = NoamLR
wsd = WarmupStableDecayLR


# ---- create_scheduler ---------------------------------------------------------------------
def _key(name: str) -> str:
    return name.strip().lower().replace("_", "").replace("-", "")


_OURS: dict[str, type] = {
    "linear_warmup": LinearWarmupLR,
    "warmup_cosine": WarmupCosineLR,
    "noam": NoamLR,
    "wsd": WarmupStableDecayLR,
}


def _torch_schedulers() -> dict[str, type]:
    found = {}
    for name, obj in vars(_torch_sched).items():
        if (isinstance(obj, type) and issubclass(obj, LRScheduler) and not name.startswith("_")
                and obj is not LRScheduler and obj is not _torch_sched.ChainedScheduler):
            found[name] = obj   # ChainedScheduler takes schedulers, not an optimizer: use it directly
    return found


def _scheduler_table() -> dict[str, tuple[str, type]]:
    table = {}
    for display, cls in {**_OURS, **_torch_schedulers()}.items():
        table[_key(display)] = (display, cls)
    for cls in _OURS.values():
        table.setdefault(_key(cls.__name__), (cls.__name__, cls))
    return table


def list_schedulers() -> list[str]:
    """The names :func:`create_scheduler` accepts (case, ``_`` and ``-`` are ignored)."""
    return sorted({display for display, _ in _scheduler_table().values()}, key=str.lower)


# Absolute lrs of torch schedulers that take one value per group: scaled by lr_scale.
_ABSOLUTE_LR_ARGS = {"OneCycleLR": ("max_lr",), "CyclicLR": ("base_lr", "max_lr"),
                     "ReduceLROnPlateau": ("min_lr",)}


def create_scheduler(optimizer: Optimizer, name: str, **kwargs: Any) -> LRScheduler:
    """Build a scheduler by name: ``linear_warmup``, ``warmup_cosine``, ``noam``, ``wsd``, or
    any ``torch.optim.lr_scheduler`` class (``StepLR``, ``LambdaLR``, ``CosineAnnealingLR``,
    ``OneCycleLR``, ``ReduceLROnPlateau``, ``SequentialLR``, ...). Names ignore case, ``_`` and
    ``-`` (``"step_lr"`` is ``StepLR``). Unknown names and arguments raise ``ValueError``
    naming the valid ones.

    For ``OneCycleLR`` / ``CyclicLR`` / ``ReduceLROnPlateau`` a scalar ``max_lr`` /
    ``base_lr`` / ``min_lr`` becomes one value per group, times the group's ``lr_scale``.
    """
    table = _scheduler_table()
    key = _key(name)
    if key not in table:
        names = list_schedulers()
        close = difflib.get_close_matches(key, list(table), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(table[c][0]) for c in close)}?" if close else ""
        raise ValueError(f"unknown scheduler {name!r}{hint} (valid: {', '.join(names)})")
    display, cls = table[key]
    params = inspect.signature(cls.__init__).parameters
    valid = [n for n, p in params.items() if n not in ("self", "optimizer")
             and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        hints = [f"{k!r} (did you mean {c[0]!r}?)" if (c := difflib.get_close_matches(k, valid, n=1))
                 else repr(k) for k in unknown]
        raise ValueError(f"{display} got unknown argument(s) {', '.join(hints)}; "
                         f"valid arguments: {', '.join(valid)}")
    scales = [float(g.get("lr_scale", 1.0)) for g in optimizer.param_groups]
    if any(s != 1.0 for s in scales):
        for arg in _ABSOLUTE_LR_ARGS.get(cls.__name__, ()):
            if isinstance(kwargs.get(arg), numbers.Real):
                kwargs[arg] = [kwargs[arg] * s for s in scales]
    return cls(optimizer, **kwargs)
