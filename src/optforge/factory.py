"""Build optimizers by name: param groups, ``create_optimizer``, and command-line arguments.

What a training script writes::

    opt = optforge.create_optimizer(model, "adamw", lr=3e-4, weight_decay=0.05)

    parser = argparse.ArgumentParser()
    optforge.add_optimizer_args(parser)          # --optimizer_type NAME --optimizer_args k=v ...
    args = parser.parse_args()
    opt = optforge.optimizer_from_args(model, args)

The registry itself (one line per optimizer, aliases, defaults) lives in
:mod:`optforge.registry`.
"""

from __future__ import annotations

import argparse
import difflib
import fnmatch
import inspect
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .registry import OptimInfo, get_optimizer_info, list_optimizers
from .wrappers.lookahead import Lookahead, check_alpha, check_k

__all__ = [
    "NORM_TYPES",
    "add_optimizer_args",
    "create_optimizer",
    "optimizer_from_args",
    "param_groups_layer_decay",
    "param_groups_weight_decay",
    "parse_optimizer_args",
    "unwrap_model",
]

#: Module types whose parameters never get weight decay (matched with ``isinstance``, so
#: subclasses such as timm's ``LayerNorm2d`` count too).
NORM_TYPES: tuple[type[nn.Module], ...] = tuple(
    t for t in (getattr(nn, n, None) for n in (
        "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm",
        "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d",
        "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
        "LazyInstanceNorm1d", "LazyInstanceNorm2d", "LazyInstanceNorm3d",
        "LayerNorm", "GroupNorm", "RMSNorm", "LocalResponseNorm", "CrossMapLRN2d",
    )) if t is not None
)

_WRAPPER_TYPES: tuple[type, ...] = (nn.DataParallel, nn.parallel.DistributedDataParallel)
_WRAPPER_NAMES = frozenset({"DataParallel", "DistributedDataParallel"})  # apex and look-alikes


# ---- param groups ---------------------------------------------------------------------------
def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside ``torch.compile`` (``_orig_mod``) and DataParallel /
    DistributedDataParallel (``.module``) wrappers, in any nesting, so parameter names and
    ``no_weight_decay()`` are the model's own."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module) and (isinstance(model, _WRAPPER_TYPES)
                                             or type(model).__name__ in _WRAPPER_NAMES):
            model = inner
            continue
        return model


def _call_or_value(obj: Any) -> Iterable[str]:
    value = obj() if callable(obj) else obj
    return () if value is None else value


def _model_skips(model: nn.Module) -> tuple[set[str], set[str]]:
    """Names from every (sub)module's ``no_weight_decay()`` (prefixed with the submodule's
    path) and keywords from ``no_weight_decay_keywords()``."""
    names: set[str] = set()
    keywords: set[str] = set()
    for prefix, module in model.named_modules():
        dot = prefix + "." if prefix else ""
        if hasattr(module, "no_weight_decay"):
            names.update(dot + n for n in _call_or_value(module.no_weight_decay))
        if hasattr(module, "no_weight_decay_keywords"):
            keywords.update(_call_or_value(module.no_weight_decay_keywords))
    return names, keywords


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """``name`` is a pattern, lies under a module a pattern names, or fits a wildcard one."""
    for pat in patterns:
        if name == pat or name.startswith(pat + "."):
            return True
        if any(c in pat for c in "*?[") and fnmatch.fnmatchcase(name, pat):
            return True
    return False


def _no_decay_test(model: nn.Module, skip_list: Iterable[str],
                   skip_keywords: Iterable[str]) -> Callable[[str, torch.Tensor], bool]:
    names, keywords = _model_skips(model)
    names.update([skip_list] if isinstance(skip_list, str) else skip_list)
    keywords.update([skip_keywords] if isinstance(skip_keywords, str) else skip_keywords)
    norm_ids = {id(p) for m in model.modules() if isinstance(m, NORM_TYPES)
                for p in m.parameters(recurse=False)}

    def no_decay(name: str, p: torch.Tensor) -> bool:
        return (p.ndim <= 1 or name == "bias" or name.endswith(".bias") or id(p) in norm_ids
                or _matches(name, names) or any(k in name for k in keywords))

    return no_decay


def param_groups_weight_decay(model: nn.Module, weight_decay: float, skip_list: Iterable[str] = (),
                              skip_keywords: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Two param groups: ``[{"params": no_decay, "weight_decay": 0.0}, {"params": decay,
    "weight_decay": weight_decay}]`` (an empty one is left out).

    No decay for: tensors with ``ndim <= 1`` (biases, norm scales, scalars), names ending in
    ``.bias``, every parameter of a normalization module (by type: :data:`NORM_TYPES`, so a
    ``LayerNorm((C, H, W))`` weight counts), names from ``no_weight_decay()`` of the model or
    of any submodule (prefixed with its path) and from ``skip_list`` (exact names, module
    prefixes, or ``fnmatch`` wildcards), and names containing a keyword from
    ``no_weight_decay_keywords()`` or ``skip_keywords``. Embedding tables are decayed unless
    listed. Frozen parameters (``requires_grad=False``) are left out: add them with
    ``optimizer.add_param_group`` when you unfreeze them. ``model`` is unwrapped first
    (:func:`unwrap_model`).
    """
    model = unwrap_model(model)
    no_decay_test = _no_decay_test(model, skip_list, skip_keywords)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if no_decay_test(name, p) else decay).append(p)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
    return [g for g in groups if g["params"]]


_BLOCK_RE = re.compile(r"(?:^|\.)(?:blocks|layers|layer|resblocks|h)\.(\d+)(?:\.|$)")
_EMBED_NAMES = ("cls_token", "mask_token", "dist_token", "reg_token")


def _default_layer_ids(model: nn.Module, names: Sequence[str]) -> list[int | None]:
    """Block ``N`` -> ``N + 1``; embeddings and whatever precedes the first block -> 0;
    None (the head) for everything after."""
    embed_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding)
                 for p in m.parameters(recurse=False)}
    params = dict(model.named_parameters())
    ids: list[int | None] = []
    seen_block = False
    for name in names:
        match = _BLOCK_RE.search(name)
        if match:
            seen_block = True
            ids.append(int(match.group(1)) + 1)
        elif (id(params[name]) in embed_ids or "embed" in name.split(".")[0]
              or name.split(".")[0] in _EMBED_NAMES or not seen_block):
            ids.append(0)
        else:
            ids.append(None)
    if not seen_block:   # no blocks: only embeddings are "early"
        ids = [0 if (id(params[n]) in embed_ids or "embed" in n.split(".")[0]
                     or n.split(".")[0] in _EMBED_NAMES) else None for n in names]
    return ids


def param_groups_layer_decay(model: nn.Module, weight_decay: float, layer_decay: float, *,
                             lr: float | None = None, skip_list: Iterable[str] = (),
                             skip_keywords: Iterable[str] = (), filter_bias_and_bn: bool = True,
                             layer_id_fn: Callable[[str], int | None] | None = None
                             ) -> list[dict[str, Any]]:
    r"""Param groups with layer-wise lr decay (BEiT/MAE fine-tuning, timm's ViT recipe).

    Each parameter gets a layer id: ``blocks.N`` / ``layers.N`` / ``layer.N`` / ``h.N`` /
    ``resblocks.N`` (first match in the name) -> ``N + 1``; embeddings (``nn.Embedding``
    modules, top-level names containing ``embed``, ``cls_token``-like tokens) and anything
    registered before the first block -> 0; everything after the blocks (final norm, head)
    -> :math:`L` = (largest id) + 1. ``layer_id_fn(name)`` may return the id for any name
    (None falls back to these rules) for models these rules don't fit (hierarchical stages,
    encoder-decoder stacks).

    Layer :math:`i` gets ``lr_scale`` :math:`= \text{layer\_decay}^{L - i}` (the head 1, the
    embeddings the smallest). Groups are split by layer and by decay / no decay (same rules
    as :func:`param_groups_weight_decay` when ``filter_bias_and_bn``) and carry
    ``lr_scale`` and ``layer_id``. With ``lr`` each group also gets ``"lr": lr * lr_scale``,
    which is what :func:`create_optimizer` does; without it, call
    :func:`optforge.schedules.set_lr` ``(opt, lr)`` after building the optimizer (see
    :mod:`optforge.schedules` for how the scale meets schedulers).
    """
    if isinstance(layer_decay, bool) or not (isinstance(layer_decay, (int, float)) and layer_decay > 0):
        raise ValueError(f"invalid layer_decay={layer_decay!r}: expected a number > 0")
    model = unwrap_model(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay_test = _no_decay_test(model, skip_list, skip_keywords)
    names = [n for n, _ in named]
    ids = _default_layer_ids(model, names)
    if layer_id_fn is not None:
        ids = [custom if (custom := layer_id_fn(n)) is not None else i for n, i in zip(names, ids)]
    last = max((i for i in ids if i is not None), default=-1) + 1
    ids = [last if i is None else i for i in ids]
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for (name, p), layer in sorted(zip(named, ids), key=lambda x: x[1]):
        skip = (filter_bias_and_bn and no_decay_test(name, p)) or weight_decay == 0
        group = groups.get((layer, skip))
        if group is None:
            scale = float(layer_decay) ** (last - layer)
            group = {"params": [], "weight_decay": 0.0 if skip else weight_decay,
                     "lr_scale": scale, "layer_id": layer}
            if lr is not None:
                group["lr"] = lr * scale
            groups[(layer, skip)] = group
        group["params"].append(p)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], not k[1]))]


# ---- create_optimizer -------------------------------------------------------------------------
_FACTORY_OPTIONS = ("filter_bias_and_bn", "skip_list", "skip_keywords", "layer_decay")
#: ``"lookahead_" + any registered name`` builds that optimizer wrapped in :class:`Lookahead`
#: (timm's naming), configured by these create_optimizer options.
LOOKAHEAD_PREFIX = "lookahead_"
_LOOKAHEAD_OPTIONS = ("lookahead_k", "lookahead_alpha")


def resolve_optimizer_name(name: str) -> tuple[OptimInfo, bool]:
    """The registered optimizer ``name`` means, and whether it asks for :class:`Lookahead`
    around it (``"lookahead_adamw"`` -> (AdamW's record, True); any case, any alias).
    Unknown names raise ``ValueError`` with close matches, prefixed ones included."""
    key = name.strip() if isinstance(name, str) else name
    if not (isinstance(key, str) and key.lower().startswith(LOOKAHEAD_PREFIX)):
        if isinstance(key, str) and key.lower() == "lookahead":
            raise ValueError(f"unknown optimizer {name!r}: Lookahead wraps an optimizer, name both as "
                             f"'lookahead_<optimizer>', e.g. 'lookahead_adamw'")
        return get_optimizer_info(name), False
    inner = key[len(LOOKAHEAD_PREFIX):]
    try:
        return get_optimizer_info(inner), True
    except ValueError:
        known = [LOOKAHEAD_PREFIX + n for i in list_optimizers(with_info=True)
                 for n in (i.name, *(a.lower() for a in i.aliases))]
        close = difflib.get_close_matches(key.lower(), known, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown optimizer {name!r}{hint} ('lookahead_' goes before a registered name, "
                         f"e.g. 'lookahead_adamw'; see optforge.list_optimizers())") from None


def _accepted_args(cls: type) -> list[str] | None:
    """The optimizer's keyword arguments, or None when it takes ``**kwargs``."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return [n for n, p in params.items() if n not in ("self", "params") and p.kind is not p.VAR_POSITIONAL]


def _base_options(info: OptimInfo) -> tuple[str, ...]:
    """The base options (``Optimizer.configure``) an optforge optimizer takes as keywords here."""
    from .base import BASE_OPTIONS, Optimizer

    return tuple(BASE_OPTIONS) if issubclass(info.cls, Optimizer) else ()


def _check_kwargs(info: OptimInfo, kwargs: dict[str, Any], lookahead: bool = False) -> None:
    valid = _accepted_args(info.cls)
    if valid is None:
        return
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        hints = []
        options = [*_FACTORY_OPTIONS, *_base_options(info), *(_LOOKAHEAD_OPTIONS if lookahead else ())]
        for k in unknown:
            close = difflib.get_close_matches(k, [*valid, *options], n=1)
            hints.append(f"{k!r} (did you mean {close[0]!r}?)" if close else repr(k))
        raise ValueError(
            f"optimizer {info.cls.__name__} ({info.name!r}) has no argument {', '.join(hints)}; "
            f"valid arguments: {', '.join(valid)}; create_optimizer options: {', '.join(options)}"
        )


def create_optimizer(model_or_params: nn.Module | Iterable[Any], name: str, lr: float | None = None,
                     weight_decay: float | None = None, *, filter_bias_and_bn: bool = True,
                     skip_list: Iterable[str] = (), skip_keywords: Iterable[str] = (),
                     layer_decay: float | None = None, **kwargs: Any) -> torch.optim.Optimizer:
    """Build the registered optimizer ``name`` (any alias, any case: ``"LodeW"``) for a model.

    - ``lr`` / ``weight_decay``: None means the optimizer's own default (so
      ``create_optimizer(model, "adamw")`` decays with AdamW's 1e-2, like ``AdamW(params)``).
    - With a model (``nn.Module``; DDP / ``torch.compile`` wrappers are unwrapped) and a
      non-zero weight decay, ``filter_bias_and_bn`` splits the parameters with
      :func:`param_groups_weight_decay` (``skip_list`` / ``skip_keywords`` add to its rules);
      otherwise all trainable parameters form one group. Frozen parameters are left out.
    - ``layer_decay``: layer-wise lr decay groups from :func:`param_groups_layer_decay`, with
      each group's lr set to ``lr * lr_scale`` (``lr`` or the optimizer's default).
    - An optimizer registered with ``prepare_groups`` (Muon) then reshapes those groups.
    - Params or param groups (not a module) are passed through as given; a group that has an
      ``lr_scale`` but no ``lr`` gets ``lr * lr_scale``.
    - ``**kwargs`` go to the optimizer. A name it does not accept raises ``ValueError`` naming
      it and the valid ones (nothing is silently dropped); an unknown optimizer name raises
      ``ValueError`` with close matches. The base options of optforge optimizers
      (``state_precision``, ``skip_nonfinite``, ``fp32_state``, ...) go to its ``configure``.
    - ``"lookahead_" + name`` (``"lookahead_adamw"``, ``"Lookahead_LodeW"``) returns that
      optimizer wrapped in :class:`optforge.Lookahead`; ``lookahead_k`` / ``lookahead_alpha``
      (default 5 / 0.5) set its ``k`` / ``alpha`` and are refused without the prefix.
      ``"lookahead_" + name`` is not listed by ``list_optimizers()``.
    """
    info, lookahead = resolve_optimizer_name(name)
    lookahead_args = {k[len(LOOKAHEAD_PREFIX):]: kwargs.pop(k) for k in _LOOKAHEAD_OPTIONS if k in kwargs}
    if lookahead_args and not lookahead:
        given = ", ".join(f"lookahead_{k}" for k in lookahead_args)
        raise ValueError(f"{given} configure Lookahead, which {name!r} does not ask for: use the name "
                         f"{LOOKAHEAD_PREFIX + info.name!r}")
    for key, check in (("k", check_k), ("alpha", check_alpha)):
        if key in lookahead_args:
            check(LOOKAHEAD_PREFIX + key, lookahead_args[key])     # the error names the option given
    if lr is not None:
        kwargs["lr"] = lr
    if weight_decay is not None:
        kwargs["weight_decay"] = weight_decay
    options = {k: kwargs.pop(k) for k in _base_options(info) if k in kwargs}
    _check_kwargs(info, kwargs, lookahead)
    if options:
        from .base import BASE_OPTION_CONSTRAINTS
        from .lowbit import check_supported

        for key, value in options.items():
            BASE_OPTION_CONSTRAINTS[key](key, value)
        check_supported(info.cls, options)
    wd = kwargs.get("weight_decay", info.defaults.get("weight_decay", 0.0))
    base_lr = kwargs.get("lr", info.defaults.get("lr"))

    def scaled_lr(scale: float) -> float:
        if base_lr is None:
            raise ValueError(f"{info.cls.__name__} has no default lr: pass lr= to scale it by lr_scale")
        return base_lr * scale

    if isinstance(model_or_params, nn.Module):
        model = unwrap_model(model_or_params)
        if layer_decay is not None:
            scaled_lr(1.0)
            params: Any = param_groups_layer_decay(
                model, wd, layer_decay, lr=base_lr, skip_list=skip_list, skip_keywords=skip_keywords,
                filter_bias_and_bn=filter_bias_and_bn)
        elif wd and filter_bias_and_bn:
            params = param_groups_weight_decay(model, wd, skip_list, skip_keywords)
        else:
            params = [p for p in model.parameters() if p.requires_grad]
        if info.prepare_groups is not None:
            groups = params if params and isinstance(params[0], dict) else [{"params": params}]
            params = info.prepare_groups(model, groups)
    else:
        if layer_decay is not None:
            raise ValueError("layer_decay needs the model (an nn.Module), not a list of parameters")
        params = [{**g, "lr": scaled_lr(float(g["lr_scale"]))}
                  if isinstance(g, dict) and "lr_scale" in g and "lr" not in g else g
                  for g in model_or_params]
    optimizer = info.cls(params, **kwargs)
    if options:
        optimizer.configure(**options)
    return Lookahead(optimizer, **lookahead_args) if lookahead else optimizer


# ---- command-line arguments ------------------------------------------------------------------
_INT_RE = re.compile(r"[+-]?\d+")
_FLOAT_RE = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?|[+-]?(?:inf|infinity|nan)", re.I)


def _parse_scalar(text: str, token: str) -> Any:
    s = text.strip()
    if not s:
        raise ValueError(f"malformed optimizer argument {token!r}: empty element in {text!r}")
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        return s[1:-1]
    low = s.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if _INT_RE.fullmatch(s):
        return int(s)
    if _FLOAT_RE.fullmatch(s):
        return float(s)
    return s


def _parse_value(text: str, token: str) -> Any:
    s = text.strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        return s[1:-1]                                     # quoted: a string, commas and all
    bracketed = len(s) >= 2 and (s[0], s[-1]) in (("(", ")"), ("[", "]"))
    if bracketed:
        s = s[1:-1].strip()
        if not s:
            return ()
    if "," not in s and not bracketed:
        return _parse_scalar(s, token)
    parts = s.split(",")
    if parts[-1].strip() == "" and len(parts) > 1:         # "0.9," is the 1-tuple (0.9,)
        parts = parts[:-1]
    return tuple(_parse_scalar(p, token) for p in parts)


def parse_optimizer_args(tokens: Iterable[str] | str | None) -> dict[str, Any]:
    """``["betas=0.9,0.99", "eps=1e-8", "nesterov=true"]`` -> ``{"betas": (0.9, 0.99),
    "eps": 1e-08, "nesterov": True}``.

    Values, in order: ``'quoted'`` / ``"quoted"`` -> the string inside; ``true`` / ``false``
    (any case) -> bool; ``none`` / ``null`` (any case) -> None; digits -> int (so ``1`` is the
    int 1, never True: a bool option needs ``true``); a decimal or exponent number -> float
    (``1e-8``, ``.5``, ``inf``); a comma-separated list, optionally in ``()`` or ``[]`` ->
    tuple of those (``0.9,0.99``; ``0.9,`` is a 1-tuple; ``()`` is empty); anything else -> the
    string (``weight_decay_mode=decoupled``). A string ``tokens`` is split on whitespace.

    Raises ``ValueError`` naming the token for: no ``=``, an empty key, a key that is not a
    Python identifier, an empty value or tuple element, a duplicate key.
    """
    if tokens is None:
        return {}
    if isinstance(tokens, str):
        tokens = tokens.split()
    out: dict[str, Any] = {}
    for token in tokens:
        if not isinstance(token, str):
            raise TypeError(f"optimizer argument {token!r} is not a string 'key=value'")
        if "=" not in token:
            raise ValueError(f"malformed optimizer argument {token!r}: expected key=value, "
                             f"e.g. betas=0.9,0.99")
        key, value = token.split("=", 1)
        key = key.strip()
        if not key:
            raise ValueError(f"malformed optimizer argument {token!r}: empty key")
        if not key.isidentifier():
            raise ValueError(f"malformed optimizer argument {token!r}: key {key!r} is not a name")
        if not value.strip():
            raise ValueError(f"malformed optimizer argument {token!r}: empty value for {key!r}")
        if key in out:
            raise ValueError(f"duplicate optimizer argument {key!r} in {token!r}")
        out[key] = _parse_value(value, token)
    return out


def _optimizer_name(text: str) -> str:
    try:
        resolve_optimizer_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


class _OptimizerArgsAction(argparse.Action):
    """Keeps the raw ``key=value`` tokens (loggable, re-runnable), checked at parse time."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            parse_optimizer_args(values)
        except ValueError as e:
            raise argparse.ArgumentError(self, str(e)) from None
        setattr(namespace, self.dest, list(values))


def add_optimizer_args(parser: argparse.ArgumentParser, default: str = "adamw") -> argparse._ArgumentGroup:
    """Add ``--optimizer_type NAME`` (default ``default``; any registered name or alias, any
    case) and ``--optimizer_args key=value ...`` (see :func:`parse_optimizer_args`) to
    ``parser``; both are checked at parse time. Returns the argument group. Build the
    optimizer with :func:`optimizer_from_args`."""
    group = parser.add_argument_group("optimizer (optforge)")
    group.add_argument("--optimizer_type", "--optimizer-type", dest="optimizer_type", default=default,
                       type=_optimizer_name, metavar="NAME",
                       help=f"optimizer name or alias, e.g. adamw, LodeW, momentum_sgd "
                            f"(see `optforge list`; default: {default})")
    group.add_argument("--optimizer_args", "--optimizer-args", dest="optimizer_args", nargs="*",
                       default=[], action=_OptimizerArgsAction, metavar="KEY=VALUE",
                       help="optimizer hyperparameters, e.g. betas=0.9,0.99 eps=1e-8 nesterov=true")
    return group


def optimizer_from_args(model_or_params: nn.Module | Iterable[Any],
                        args: argparse.Namespace) -> torch.optim.Optimizer:
    """``create_optimizer(model, args.optimizer_type, **parse_optimizer_args(args.optimizer_args))``.

    If the script has its own ``--lr`` / ``--weight_decay`` (attributes ``args.lr`` /
    ``args.weight_decay``) and they are not None, they are passed too, unless
    ``--optimizer_args`` names the same key: the explicit ``key=value`` wins, since a script
    flag may just be its default. ``--optimizer_args`` may also hold create_optimizer options
    (``layer_decay=0.75``, ``filter_bias_and_bn=false``).
    """
    raw = getattr(args, "optimizer_args", None)
    kwargs = dict(raw) if isinstance(raw, dict) else parse_optimizer_args(raw or [])
    for flag in ("lr", "weight_decay"):
        value = getattr(args, flag, None)
        if value is not None and flag not in kwargs:
            kwargs[flag] = value
    return create_optimizer(model_or_params, getattr(args, "optimizer_type", "adamw"), **kwargs)
