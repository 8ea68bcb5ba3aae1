"""Optimizer state keyed by parameter name, so checkpoints survive model surgery.

torch matches optimizer state to parameters by position: add, remove or reorder a layer and
``load_state_dict`` either refuses the checkpoint or, worse, gives one parameter another's
momentum. These two functions key the state by the parameter's name instead::

    sd = optforge.state_dict_by_name(opt, model)          # {"state": {"fc.weight": {...}}, ...}
    torch.save(sd, "opt.pt")
    ...                                                   # the model gains and loses layers
    report = optforge.load_state_dict_by_name(opt, model, torch.load("opt.pt"), strict=False)
    report.missing      # names of this optimizer's params the checkpoint has nothing for
    report.unexpected   # names in the checkpoint that this optimizer does not have
    report.mismatched   # names whose shape changed (their state is not loaded)
    report.hyperparameters_from   # per param group: the saved group its lr, betas, ... came from

They work for any ``torch.optim.Optimizer``, optforge's or torch's. Names come from the model
(``named_parameters()``; a shared parameter is known by its first name), from an iterable of
``(name, param)`` pairs, or, with ``model=None``, from the optimizer's own ``param_names``
(torch >= 2.6 records them when it is built from ``named_parameters()``).

Names are the model's own, as :func:`optforge.create_optimizer` sees them: a model inside
``torch.compile`` or DDP / DataParallel is unwrapped, and names that carry those wrappers'
prefixes (``_orig_mod.``, ``module.``), in the pairs, in ``param_names`` or in a saved
checkpoint, lose them. So a checkpoint moves between a compiled and a plain model, or from a
DDP run to a single process.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .factory import unwrap_model

__all__ = ["NameLoadReport", "load_state_dict_by_name", "state_dict_by_name"]

FORMAT = "optforge.state_by_name/1"
WRAPPER_PREFIXES = ("_orig_mod.", "module.")
NamedParams = nn.Module | Iterable[tuple[str, Tensor]] | None


class NameLoadReport(NamedTuple):
    """What :func:`load_state_dict_by_name` did: the names it could not match (each a sorted
    list), and where each param group's hyperparameters came from."""

    missing: list[str]       # this optimizer's params with no entry in the checkpoint (fresh state)
    unexpected: list[str]    # checkpoint entries for names this optimizer does not have (ignored)
    mismatched: list[str]    # names in both whose parameter shape differs (fresh state)
    #: for each of the optimizer's param groups, the saved group whose hyperparameters it took
    #: (the one that held its parameters), or None where it kept its own
    hyperparameters_from: list[int | None]


def _names(optimizer: torch.optim.Optimizer, model: NamedParams) -> list[list[str]]:
    """The name of every parameter of every group, in the optimizer's order."""
    if model is None:
        out = []
        for i, group in enumerate(optimizer.param_groups):
            if "param_names" not in group:
                raise ValueError(f"param group {i} has no param_names: pass the model (or its "
                                 "named_parameters()) to name the optimizer's parameters")
            out.append([own_name(n) for n in group["param_names"]])
        return _unique(out)
    pairs = unwrap_model(model).named_parameters() if isinstance(model, nn.Module) else model
    by_id: dict[int, str] = {}
    for name, p in pairs:
        by_id.setdefault(id(p), own_name(name))
    out = []
    for i, group in enumerate(optimizer.param_groups):
        names = []
        for j, p in enumerate(group["params"]):
            if id(p) not in by_id:
                raise ValueError(f"parameter {j} of param group {i} (shape {tuple(p.shape)}) is not "
                                 "a parameter of the model: it has no name")
            names.append(by_id[id(p)])
        out.append(names)
    return _unique(out)


def _unique(names: list[list[str]]) -> list[list[str]]:
    flat = [n for group in names for n in group]
    if len(set(flat)) != len(flat):
        raise ValueError("two of the optimizer's parameters have the same name")
    return names


def own_name(name: str) -> str:
    """``name`` without the prefixes of torch.compile (``_orig_mod.``) and DDP / DataParallel
    (``module.``), in any nesting."""
    while name.startswith(WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def _own_names(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A saved checkpoint with its names stripped of wrapper prefixes."""
    groups = [{**g, "params": [own_name(n) for n in g["params"]]} for g in state_dict["param_groups"]]
    return {**state_dict, "param_groups": groups,
            "state": {own_name(n): v for n, v in state_dict["state"].items()},
            "param_shapes": {own_name(n): v for n, v in state_dict["param_shapes"].items()}}


def state_dict_by_name(optimizer: torch.optim.Optimizer, model: NamedParams = None) -> dict[str, Any]:
    """``optimizer.state_dict()`` with parameters named instead of numbered.

    Returns ``{"state": {name: {...}}, "param_groups": [{..., "params": [name, ...]}],
    "param_shapes": {name: [sizes]}, "format": ...}``; like ``state_dict()``, the state tensors
    are references, not copies (``torch.save`` it, or ``copy.deepcopy`` it to keep a snapshot).
    """
    names = _names(optimizer, model)
    sd = optimizer.state_dict()
    index_to_name: dict[Any, str] = {}
    groups = []
    for group, group_names in zip(sd["param_groups"], names):
        index_to_name.update(zip(group["params"], group_names))
        groups.append({**group, "params": list(group_names)})
    shapes = {name: list(p.shape) for group, group_names in zip(optimizer.param_groups, names)
              for name, p in zip(group_names, group["params"])}
    state = {index_to_name[k]: v for k, v in sd["state"].items() if k in index_to_name}
    return {"state": state, "param_groups": groups, "param_shapes": shapes, "format": FORMAT}


def load_state_dict_by_name(optimizer: torch.optim.Optimizer, model: NamedParams,
                            state_dict: dict[str, Any], strict: bool = True) -> NameLoadReport:
    """Load a :func:`state_dict_by_name` checkpoint, matching parameters by name.

    Each parameter gets the state saved under its name; parameters without one (``missing``)
    or whose shape changed (``mismatched``) start with fresh state; saved names this optimizer
    does not have are ``unexpected``. With ``strict=True`` any of the three raises a
    ``ValueError`` listing them and nothing is loaded; with ``strict=False`` the matching names
    are loaded and the lists are returned.

    Hyperparameters (``lr``, betas, ...) follow the names too: each param group takes those
    of the saved group that held its parameters, whatever the order of the groups (a group
    split in two gives both halves its values). A group with only new parameters keeps its
    own. A group whose parameters were saved in several groups cannot take both: with
    ``strict=True`` that is a ``ValueError`` naming them (nothing loaded), with
    ``strict=False`` the group keeps its own hyperparameters. ``hyperparameters_from`` in the
    report says which saved group each group took them from. State tensors are cast as
    ``load_state_dict`` casts them (to the parameter's device, and floating ones to its dtype).
    """
    if not isinstance(state_dict, dict) or state_dict.get("format") != FORMAT:
        raise ValueError("not a state_dict_by_name() checkpoint (no 'format': "
                         f"{FORMAT!r}); for optimizer.state_dict() use optimizer.load_state_dict()")
    names = _names(optimizer, model)
    state_dict = _own_names(state_dict)
    saved_shapes: dict[str, list[int]] = state_dict["param_shapes"]
    saved_state: dict[str, Any] = state_dict["state"]
    current = {name: p for group, group_names in zip(optimizer.param_groups, names)
               for name, p in zip(group_names, group["params"])}
    missing = sorted(set(current) - set(saved_shapes))
    unexpected = sorted(set(saved_shapes) - set(current))
    mismatched = sorted(n for n in set(current) & set(saved_shapes)
                        if list(current[n].shape) != list(saved_shapes[n]))
    saved_groups = state_dict["param_groups"]
    sources, mixed = _group_sources(names, saved_groups)
    if strict and (missing or unexpected or mismatched or mixed):
        parts = [f"{label}: {', '.join(found)}" for label, found in
                 (("missing (no saved state)", missing), ("unexpected (not in this optimizer)", unexpected),
                  ("shape changed", mismatched)) if found]
        parts += [f"param group {i} holds parameters of saved param groups {' and '.join(map(str, js))} "
                  f"({', '.join(examples)}), whose hyperparameters cannot both apply"
                  for i, js, examples in mixed]
        raise ValueError("optimizer state does not match the parameters by name; " + "; ".join(parts)
                         + " (strict=False loads the names that match"
                         + (", and such a group keeps its own hyperparameters)" if mixed else ")"))
    skip = set(mismatched)

    # Rebuild a positional state dict for this optimizer and let load_state_dict cast it.
    positional_state, groups, index = {}, [], 0
    for i, (group, group_names) in enumerate(zip(optimizer.param_groups, names)):
        base = group if sources[i] is None else saved_groups[sources[i]]
        hyper = {k: v for k, v in base.items() if k not in ("params", "param_names")}
        if "param_names" in group:
            hyper["param_names"] = group["param_names"]
        ids = list(range(index, index + len(group_names)))
        index += len(group_names)
        groups.append({**hyper, "params": ids})
        for k, name in zip(ids, group_names):
            if name in saved_state and name not in skip:
                positional_state[k] = saved_state[name]
    optimizer.load_state_dict({"state": positional_state, "param_groups": groups})
    return NameLoadReport(missing, unexpected, mismatched, sources)


def _group_sources(names: list[list[str]], saved_groups: list[dict[str, Any]],
                   ) -> tuple[list[int | None], list[tuple[int, list[int], list[str]]]]:
    """For each param group (its parameter names), the saved group that held them (None: no
    saved name); and the groups whose names were in several saved groups, with those groups
    and one name from each."""
    saved_group_of = {name: j for j, g in enumerate(saved_groups) for name in g["params"]}
    sources: list[int | None] = []
    mixed = []
    for i, group_names in enumerate(names):
        first_name: dict[int, str] = {}
        for name in group_names:
            if name in saved_group_of:
                first_name.setdefault(saved_group_of[name], name)
        found = sorted(first_name)
        sources.append(found[0] if len(found) == 1 else None)
        if len(found) > 1:
            mixed.append((i, found, [first_name[j] for j in found]))
    return sources, mixed
