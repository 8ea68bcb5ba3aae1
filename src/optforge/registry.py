"""The optimizer registry: one frozen record per optimizer, looked up by name or alias.

Registering a new optimizer is one line::

    register(MyOpt, "one-line description", aliases=("myopt2",))
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["OptimInfo", "get_optimizer_info", "list_optimizers", "register"]


@dataclass(frozen=True)
class OptimInfo:
    """What the factory, the CLI and the test suites know about an optimizer."""

    name: str                       # canonical, lower case: "adamw"
    cls: type[torch.optim.Optimizer]
    description: str
    aliases: tuple[str, ...] = ()
    defaults: dict[str, Any] = field(default_factory=dict)  # from the class signature
    elementwise: bool = True        # update is elementwise (no norms/matrix structure)
    compare_lr: float | None = None  # lr the compare CLI starts from, when the default lr is not it
    #: ``(model, groups) -> groups``: how ``create_optimizer`` turns the param groups it built for
    #: a model (dicts with "params") into this optimizer's (e.g. Muon's matrix / AdamW split;
    #: names come from ``model.named_parameters()``). Not called for params passed directly.
    prepare_groups: Callable[[Any, list[dict[str, Any]]], list[dict[str, Any]]] | None = None

    @property
    def has_betas(self) -> bool:
        return "betas" in self.defaults

    @property
    def has_momentum(self) -> bool:
        return "momentum" in self.defaults

    @property
    def has_eps(self) -> bool:
        return "eps" in self.defaults


_REGISTRY: dict[str, OptimInfo] = {}
_ALIASES: dict[str, str] = {}


def _signature_defaults(cls: type) -> dict[str, Any]:
    sig = inspect.signature(cls.__init__)
    return {n: p.default for n, p in sig.parameters.items()
            if n not in ("self", "params") and p.default is not inspect.Parameter.empty}


def register(cls: type[torch.optim.Optimizer], description: str, *, name: str | None = None,
             aliases: tuple[str, ...] = (), elementwise: bool = True,
             compare_lr: float | None = None,
             prepare_groups: Callable[[Any, list[dict[str, Any]]], list[dict[str, Any]]] | None = None,
             ) -> type[torch.optim.Optimizer]:
    """Add ``cls`` to the registry under ``name`` (default: the class name, lower case)."""
    canonical = (name or cls.__name__).lower()
    keys = [canonical, *(a.lower() for a in aliases)]
    taken = [k for k in keys if k in _ALIASES]
    if taken:
        raise ValueError(f"optimizer name(s) {taken} already registered")
    info = OptimInfo(canonical, cls, description, tuple(aliases), _signature_defaults(cls),
                     elementwise, compare_lr, prepare_groups)
    _REGISTRY[canonical] = info
    for k in keys:
        _ALIASES[k] = canonical
    return cls


def _normalize(name: str) -> str:
    return name.strip().lower()


def get_optimizer_info(name: str) -> OptimInfo:
    """The record for ``name`` or one of its aliases (case-insensitive)."""
    key = _normalize(name)
    if key in _ALIASES:
        return _REGISTRY[_ALIASES[key]]
    close = difflib.get_close_matches(key, sorted(_ALIASES), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(f"unknown optimizer {name!r}{hint} (see optforge.list_optimizers())")


def list_optimizers(filter: str = "*", *, with_info: bool = False) -> list[str] | list[OptimInfo]:
    """Canonical names (or records) matching a wildcard ``filter`` on names or aliases."""
    pattern = _normalize(filter)
    hits = [info for info in _REGISTRY.values()
            if any(fnmatch.fnmatch(k, pattern) for k in (info.name, *map(str.lower, info.aliases)))]
    hits.sort(key=lambda i: i.name)
    return hits if with_info else [i.name for i in hits]
