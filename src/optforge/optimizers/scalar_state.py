"""Per-parameter 0-d state that torch.optim keeps beside ``step`` (NAdam's ``mu_product``,
ASGD's ``eta`` and ``mu``): checked and kept as saved when a state dict loads."""

from __future__ import annotations

from typing import Any

import torch


def load_keeping_scalars(opt: Any, state_dict: dict[str, Any], names: tuple[str, ...], load) -> None:
    """``load(state_dict)`` (the base class's load), after refusing a state that lacks one of
    ``names`` or holds it with a shape; afterwards those entries are put back as saved. torch's
    load casts every state tensor but ``step`` to its param's dtype and device; these are
    kept as ``step`` is, so a resumed run rounds them as the uninterrupted one does."""
    states = state_dict.get("state", {}) if isinstance(state_dict, dict) else {}
    for k, st in states.items():
        if not st:
            continue
        lacking = [n for n in names if n not in st]
        if lacking:
            raise ValueError(f"the loaded state of parameter {k} lacks {lacking} (it has {sorted(st)}): "
                             f"was it saved by another optimizer than {type(opt).__name__}?")
        for n in names:
            if torch.is_tensor(st[n]) and st[n].dim() != 0:
                raise ValueError(f"the loaded state {n!r} of parameter {k} has shape "
                                 f"{tuple(st[n].shape)}, expected () (a number)")
    saved = {k: {n: st[n] for n in names if torch.is_tensor(st[n])} for k, st in states.items() if st}
    load(state_dict)
    for saved_group, group in zip(state_dict["param_groups"], opt.param_groups):
        for k, p in zip(saved_group["params"], group["params"]):
            for n, x in saved.get(k, {}).items():
                opt.state[p][n] = x.detach().clone()


def as_scalar_tensor(value: Any, dtype: torch.dtype) -> torch.Tensor:
    """A state number as a 0-d tensor (older torch checkpoints hold Python numbers)."""
    return value if torch.is_tensor(value) else torch.tensor(float(value), dtype=dtype)
