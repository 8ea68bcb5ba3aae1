"""torch.optim's flags and checkpoints on optforge optimizers, handled once for all of them.

An optforge class named like a torch.optim one (SGD, Adam, AdamW, RAdam, Adafactor, Muon)
takes its torch counterpart's signature: ``torch.optim.Adam(...)`` -> ``optforge.Adam(...)`` is
a one-word change. The optimizer file only declares torch's flags and passes them on; their
meaning lives here:

- ``foreach`` (True / False / None): accepted, kept in the param groups; optforge always runs
  its multi-tensor path, whose results do not depend on the flag (torch's for-loop and foreach
  paths agree too). ``fused=None`` (the default) runs torch's own fused kernel where it
  computes exactly the foreach path's update, the foreach path elsewhere (:mod:`optforge.paths`).
  ``fused`` and ``foreach`` both True is refused, as torch refuses it.
- ``capturable`` and ``differentiable``: False only (see ``FLAG_CONSTRAINTS`` for why).
- ``decoupled_weight_decay`` (Adam, RAdam and their subclasses): True is
  ``weight_decay_mode="decoupled"``; the two are kept consistent in every param group (so that
  torch.optim reads an optforge state dict right), and contradicting them is a ValueError.
- a tensor ``lr`` or ``weight_decay`` (one element, any shape) is read as a Python number at
  each step (:func:`numbers_for_step`), so every optimizer, eager or fused, takes exactly the
  float-lr path, and an in-place change (``lr.fill_``) takes effect at the next step.
- checkpoints: torch.optim's state dicts load (their groups carry these flags; a state without
  ``step``, as torch's SGD and Muon write, has taken at least one step).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .constraints import Constraint, boolean, one_of, only_false, optional
from .weight_decay import WEIGHT_DECAY_MODES

__all__ = ["DECOUPLED_WEIGHT_DECAY", "FLAG_CONSTRAINTS", "TORCH_FLAGS", "adopt_saved_group",
           "check_flags", "complete_loaded_state", "numbers_for_step", "resolve_decay_flag"]

#: Checks of torch.optim's flags (every optimizer may declare any of them).
FLAG_CONSTRAINTS: dict[str, Constraint] = dict(
    foreach=optional(boolean),
    fused=optional(boolean),
    capturable=only_false("optforge reads each step's count on the host, so a step cannot be "
                          "captured in a CUDA graph"),
    differentiable=only_false("optforge steps run under torch.no_grad(): the update is not part "
                              "of the autograd graph"),
    decoupled_weight_decay=boolean,
)
#: Flags that select no arithmetic: never compile-time constants of a fused kernel.
TORCH_FLAGS = frozenset(FLAG_CONSTRAINTS)

#: ``constraints`` entries of an optimizer with torch's ``decoupled_weight_decay`` (Adam,
#: RAdam): its ``weight_decay_mode`` may be None in the signature ("as decoupled_weight_decay
#: says"), never in a param group.
DECOUPLED_WEIGHT_DECAY: dict[str, Constraint] = dict(
    decoupled_weight_decay=boolean,
    weight_decay_mode=optional(one_of(*WEIGHT_DECAY_MODES)),
)

#: Hyperparameters torch.optim accepts as tensors; read as numbers at each step.
TENSOR_HYPERPARAMETERS = ("lr", "weight_decay")


def check_flags(owner: str, values: dict[str, Any]) -> None:
    """Checks that span the flags (per-flag checks are in ``FLAG_CONSTRAINTS``)."""
    if values.get("fused") and values.get("foreach"):
        raise ValueError(f"invalid fused=True with foreach=True for {owner}: they cannot be True "
                         "together (as in torch.optim); leave foreach=None")


def resolve_decay_flag(values: dict[str, Any], defaults: dict[str, Any] | None = None) -> None:
    """Make ``weight_decay_mode`` and torch's ``decoupled_weight_decay`` agree, in place, in a
    signature's values (``defaults=None``) or a param group (given the optimizer's defaults).

    ``decoupled_weight_decay=True`` asks for ``"decoupled"``: another mode given with it is a
    ValueError. A mode given (not None) decides, and sets the flag. Else the flag decides: True
    is ``"decoupled"``; False is the default mode, or ``"coupled"`` where that is
    ``"decoupled"`` (AdamW). Does nothing for an optimizer without the flag."""
    if "decoupled_weight_decay" not in (values if defaults is None else defaults):
        return
    has_flag = "decoupled_weight_decay" in values
    flag, mode = values.get("decoupled_weight_decay"), values.get("weight_decay_mode")
    if has_flag:
        boolean("decoupled_weight_decay", flag)
    if flag and mode not in (None, "decoupled"):
        raise ValueError(f"invalid decoupled_weight_decay=True with weight_decay_mode={mode!r}: "
                         "decoupled_weight_decay=True is weight_decay_mode='decoupled'")
    if mode is None:
        if not has_flag:                 # a group that sets neither inherits both
            values.pop("weight_decay_mode", None)
            return
        default = "coupled" if defaults is None else defaults["weight_decay_mode"]
        mode = "decoupled" if flag else ("coupled" if default == "decoupled" else default)
    values["weight_decay_mode"] = mode
    values["decoupled_weight_decay"] = mode == "decoupled"


def adopt_saved_group(group: dict[str, Any], defaults: dict[str, Any]) -> None:
    """A param group loaded from a torch.optim checkpoint has ``decoupled_weight_decay`` but no
    ``weight_decay_mode``: give it the mode the flag means (before defaults fill the rest). An
    optimizer decoupled by default (AdamW) stays decoupled, as torch's AdamW does whatever a
    loaded group says."""
    if "decoupled_weight_decay" in defaults and "weight_decay_mode" not in group \
            and "decoupled_weight_decay" in group:
        if defaults["weight_decay_mode"] == "decoupled":
            group["decoupled_weight_decay"] = True
        resolve_decay_flag(group, defaults)


def complete_loaded_state(state: dict[str, Any], step_dtype: torch.dtype) -> None:
    """A parameter's loaded state in optforge's form: an integer ``step`` (old checkpoints)
    becomes a tensor; a state without one (torch's SGD and Muon keep no count) has taken at
    least one step, so it gets 1 (e.g. SGD's next momentum step then dampens, as torch's
    does once a momentum buffer exists)."""
    step = state.get("step")
    if step is None:
        state["step"] = torch.tensor(1.0, dtype=step_dtype)
    elif not torch.is_tensor(step):
        state["step"] = torch.tensor(float(step), dtype=step_dtype)


@contextmanager
def numbers_for_step(group: dict[str, Any]) -> Iterator[None]:
    """During one step, a tensor ``lr`` / ``weight_decay`` of ``group`` is its Python number
    (``.item()``: one read from the device per step); the tensor is put back afterwards."""
    tensors = {k: group[k] for k in TENSOR_HYPERPARAMETERS if isinstance(group.get(k), torch.Tensor)}
    if not tensors:
        yield
        return
    group.update({k: v.item() for k, v in tensors.items()})
    try:
        yield
    finally:
        group.update(tensors)
