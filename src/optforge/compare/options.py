"""Parsing and checking of the compare command's values: optimizer lists, ``--lr``,
``--optimizer_args``, ``--seeds``, and the lr each optimizer starts from.

Every function raises ``ValueError`` with a one-line message naming the bad piece of input.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..factory import LOOKAHEAD_PREFIX, base_option_names, create_optimizer, resolve_optimizer_name
from ..factory import parse_optimizer_args as parse_kwargs
from ..registry import list_optimizers

__all__ = ["canonical_name", "default_lr", "parse_lrs", "parse_optimizer_args",
           "parse_optimizers", "parse_seeds", "check_optimizer"]

_LOOKAHEAD_ARGS = {"lookahead_k": 5, "lookahead_alpha": 0.5}


def canonical_name(name: str) -> str:
    """The registry name (``"LodeW"`` -> ``"compass"``), with ``lookahead_`` kept in front of
    it (``"Lookahead_AdamW"`` -> ``"lookahead_adamw"``). ValueError for an unknown name."""
    info, lookahead = resolve_optimizer_name(name)
    return LOOKAHEAD_PREFIX + info.name if lookahead else info.name


def default_lr(name: str) -> float:
    """The registry's ``compare_lr``, else the class default lr (the base's, for Lookahead)."""
    info, _ = resolve_optimizer_name(name)
    if info.compare_lr is not None:
        return float(info.compare_lr)
    return float(info.defaults.get("lr", 1e-3))


#: Registered optimizers compare's training loop (``loss.backward(); opt.step()`` on dense
#: gradients) cannot run, and why; wildcards leave them out, naming them is an error.
NOT_COMPARABLE = {
    "lbfgs": "it needs opt.step(closure), re-evaluating the loss several times per step",
    "sparse_adam": "it takes sparse gradients only (nn.Embedding(sparse=True)); the models here give "
                   "dense ones",
}


def _expand(part: str) -> list[str]:
    """One ``--optimizers`` entry: a name, or a wildcard (``adam*``, ``lookahead_adam*``) on
    registered names and aliases, as ``optforge list`` matches them."""
    if not any(c in part for c in "*?["):
        name = canonical_name(part)                  # ValueError for an unknown name
        base = name.removeprefix(LOOKAHEAD_PREFIX)
        if base in NOT_COMPARABLE:
            raise ValueError(f"--optimizers {part.strip()!r}: compare cannot train {base}: "
                             f"{NOT_COMPARABLE[base]}")
        return [name]
    key = part.strip().lower()
    prefix = LOOKAHEAD_PREFIX if key.startswith(LOOKAHEAD_PREFIX) else ""
    hits = [h for h in list_optimizers(key[len(prefix):]) if h not in NOT_COMPARABLE]
    if not hits:
        raise ValueError(f"--optimizers {part.strip()!r} matches no optimizer (see optforge list)")
    return [prefix + h for h in hits]


def parse_optimizers(spec: str) -> list[str]:
    """``"sgd,Adam,lodew,ada*"`` -> canonical names in order, wildcards expanded (sorted),
    duplicates (and aliases of one) dropped."""
    names: list[str] = []
    for part in spec.split(","):
        if not part.strip():
            continue
        for name in _expand(part):
            if name not in names:
                names.append(name)
    if not names:
        raise ValueError(f"--optimizers {spec!r} names no optimizer")
    return names


def _positive_float(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"malformed {what}: {text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"malformed {what}: {text!r} must be a positive finite number")
    return value


def parse_lrs(specs: list[str] | None, optimizers: list[str]) -> dict[str, float]:
    """``--lr`` values: ``name=value`` pairs separated by commas (the flag may repeat); a bare
    value sets every optimizer. Names may be aliases and must be among ``optimizers``."""
    lrs: dict[str, float] = {}
    for spec in specs or []:
        for part in spec.split(","):
            part = part.strip()
            if not part:
                raise ValueError(f"malformed --lr {spec!r}: empty entry (expected name=value,...)")
            if "=" not in part:
                value = _positive_float(part, f"--lr {spec!r}")
                lrs.update(dict.fromkeys(optimizers, value))
                continue
            key, _, text = part.partition("=")
            if not key.strip():
                raise ValueError(f"malformed --lr {spec!r}: {part!r} has no optimizer name")
            name = canonical_name(key)
            if name not in optimizers:
                raise ValueError(f"--lr names {key.strip()!r}, which is not in --optimizers "
                                 f"({','.join(optimizers)})")
            lrs[name] = _positive_float(text.strip(), f"--lr {spec!r}")
    return lrs


def parse_optimizer_args(specs: list[str] | None, optimizers: list[str]) -> dict[str, dict[str, Any]]:
    """``--optimizer_args`` items ``[NAME:]KEY=VALUE``; without ``NAME:`` the item applies to
    every optimizer. Keys are checked against each optimizer's signature and base options
    (``state_precision=int8``)."""
    out: dict[str, dict[str, Any]] = {name: {} for name in optimizers}
    for spec in specs or []:
        target, sep, assignment = spec.partition(":")
        if not sep or "=" in target:
            target, assignment = "", spec
        key, eq, text = assignment.partition("=")
        key = key.strip()
        if not eq or not key or not text.strip():
            raise ValueError(f"malformed --optimizer_args {spec!r} (expected [name:]key=value)")
        if key == "lr":
            raise ValueError(f"--optimizer_args {spec!r}: set learning rates with --lr")
        names = optimizers
        if target.strip():
            name = canonical_name(target)
            if name not in optimizers:
                raise ValueError(f"--optimizer_args names {target.strip()!r}, which is not in "
                                 f"--optimizers ({','.join(optimizers)})")
            names = [name]
        value = parse_kwargs([f"{key}={text}"])[key]   # the same typing as training scripts get
        for name in names:
            info, lookahead = resolve_optimizer_name(name)
            valid = {**info.defaults, **dict.fromkeys(base_option_names(info)),
                     **(_LOOKAHEAD_ARGS if lookahead else {})}
            if key not in valid:
                raise ValueError(f"--optimizer_args {spec!r}: {name} has no argument {key!r} "
                                 f"(valid: {', '.join(k for k in valid if k != 'lr')})")
            out[name][key] = value
    return out


def check_optimizer(name: str, lr: float, kwargs: dict[str, Any]) -> None:
    """Build the optimizer on a dummy parameter, so a bad value fails before any training."""
    try:
        create_optimizer([torch.zeros(1, requires_grad=True)], name, lr=lr, **kwargs)
    except (ValueError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{name} with lr={lr:g}, {kwargs}: {msg}") from None


def parse_seeds(spec: str) -> list[int]:
    """``"3"`` -> [0, 1, 2]; ``"0,5,7"`` -> [0, 5, 7]."""
    try:
        if "," in spec:
            seeds = [int(s) for s in spec.split(",") if s.strip()]
            if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
                raise ValueError
            return seeds
        n = int(spec)
    except ValueError:
        raise ValueError(f"malformed --seeds {spec!r} (a count, or distinct seeds 0,1,2)") from None
    if n < 1:
        raise ValueError(f"--seeds {spec!r} must be at least 1")
    return list(range(n))
