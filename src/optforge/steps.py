"""Step counts: one 0-d tensor per parameter (torch's state format), advanced per bucket."""

from __future__ import annotations

from itertools import repeat
from operator import attrgetter, is_

import torch
from torch import Tensor

__all__ = ["advance_steps"]

_base_of = attrgetter("_base")


def advance_steps(steps: list[Tensor], values: bool = True) -> list[float]:
    """Add 1 to each step count; return the new counts (if ``values``).

    Steps created together are views of one tensor: then this is one ``add_`` and, when all
    counts agree, one read. Otherwise (e.g. after ``load_state_dict``) one foreach add."""
    base = steps[0]._base
    if base is not None and base.dim() == 1 and base.numel() == len(steps) and all(
            map(is_, map(_base_of, steps), repeat(base))):
        base.add_(1.0)
        if not values:
            return []
        counts = base.tolist()
        if min(counts) == max(counts):
            return [counts[0]] * len(steps)
    else:
        torch._foreach_add_(steps, 1.0)
    return [x.item() for x in steps] if values else []
