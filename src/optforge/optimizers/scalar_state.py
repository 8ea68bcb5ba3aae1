"""Per-parameter 0-d state that torch.optim keeps beside ``step`` (NAdam's ``mu_product``,
ASGD's ``eta`` and ``mu``): checked and kept as saved when a state dict loads."""

from __future__ import annotations

from typing import Any

import torch

from ..steps import shared_base


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


def stacked_scalars(states: list[dict[str, Any]], name: str, dtype: torch.dtype,
                    initial: float) -> torch.Tensor | None:
    """The 0-d entries ``name`` of ``states`` as the elements of one 1-d tensor, returned, so a
    step updates and reads them all at once; None if loaded entries differ in dtype. Entries
    that are not yet views of one tensor (new ones, made at ``initial`` in ``dtype``; loaded
    ones, separate tensors or numbers) are moved into a new one, keeping their dtype."""
    entries = [st.get(name) for st in states]
    if all(map(torch.is_tensor, entries)):
        base = shared_base(entries)
        if base is not None:
            return base
    dtypes = {x.dtype for x in entries if torch.is_tensor(x)}
    if len(dtypes) > 1:
        return None
    base = torch.tensor([initial if x is None else float(x) for x in entries],
                        dtype=dtypes.pop() if dtypes else dtype)
    for st, view in zip(states, base.unbind()):
        st[name] = view
    return base
