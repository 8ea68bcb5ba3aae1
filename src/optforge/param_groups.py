"""Checks on the parameters of a param group, before the optimizer takes it."""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["check_unique_params"]


def check_unique_params(param_group: dict[str, Any], groups: list[dict[str, Any]]) -> None:
    """Refuse a parameter listed twice in ``param_group``, or already in one of ``groups``
    (torch only warns about the first): the foreach path would update it twice, a fused
    kernel once. An iterable of params becomes a list (as ``add_param_group`` makes it)."""
    params = param_group["params"]
    if isinstance(params, set):
        return                              # torch's TypeError: sets have no order
    params = param_group["params"] = [params] if isinstance(params, Tensor) else list(params)
    seen: dict[int, tuple[int, int]] = {}
    for i, group in enumerate(groups):
        for j, p in enumerate(group["params"]):
            seen.setdefault(id(p), (i, j))
    new = len(groups)
    for j, entry in enumerate(params):
        name, p = entry if isinstance(entry, tuple) and len(entry) == 2 else (None, entry)
        where = seen.setdefault(id(p), (new, j))
        if where == (new, j):
            continue
        shape = f"shape {tuple(p.shape)}" if isinstance(p, Tensor) else type(p).__name__
        this = f"parameter {j} of param group {new} ({f'{name!r}, ' if name else ''}{shape})"
        if where[0] == new:
            raise ValueError(f"{this} is parameter {where[1]} of the same group again: list each "
                             "parameter once (it would be updated twice)")
        raise ValueError(f"{this} is already parameter {where[1]} of param group {where[0]}: a "
                         "parameter may not appear in more than one parameter group")
