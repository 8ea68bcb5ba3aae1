"""Step counts: one 0-d tensor per parameter (torch's state format), advanced per bucket."""

from __future__ import annotations

from itertools import repeat
from operator import attrgetter, is_

import torch
from torch import Tensor

__all__ = ["advance_steps", "shared_base", "step_values"]

_base_of = attrgetter("_base")


def shared_base(scalars: list[Tensor]) -> Tensor | None:
    """The 1-d tensor whose elements ``scalars`` are, in order, if they are all views of one
    (as the step counts and other per-parameter numbers made together are); else None."""
    base = scalars[0]._base
    if base is not None and base.dim() == 1 and base.numel() == len(scalars) and all(
            map(is_, map(_base_of, scalars), repeat(base))):
        return base
    return None


def step_values(steps: list[Tensor]) -> list[float]:
    """The step counts as numbers: one read when they are views of one tensor."""
    base = shared_base(steps)
    return base.tolist() if base is not None else [x.item() for x in steps]


def advance_steps(steps: list[Tensor], values: bool = True) -> list[float]:
    """Add 1 to each step count; return the new counts (if ``values``).

    Steps created together are views of one tensor: then this is one ``add_`` and one read.
    Otherwise (e.g. after ``load_state_dict``) one foreach add and a read per count."""
    base = shared_base(steps)
    if base is not None:
        base.add_(1.0)
        return base.tolist() if values else []
    torch._foreach_add_(steps, 1.0)
    return [x.item() for x in steps] if values else []
