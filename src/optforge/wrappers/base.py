"""What every optimizer wrapper shares: it *is* a ``torch.optim.Optimizer`` whose param groups,
state and defaults are the wrapped optimizer's own objects.

Sharing (not copying) the param groups is what makes the rest of the ecosystem work on the
wrapper: an lr scheduler, ``GradScaler.unscale_``, ``set_lr`` or gradient clipping over
``opt.param_groups`` reach the lr and the gradients the base optimizer uses. The properties
read through to the base every time, so they stay shared even after the base's
``load_state_dict`` replaces its ``param_groups`` list (torch's does).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

__all__ = ["OptimizerWrapper"]


class OptimizerWrapper(torch.optim.Optimizer):
    """Base of :class:`~optforge.Lookahead` and :class:`~optforge.SAM`.

    A subclass of ``torch.optim.Optimizer`` (schedulers check ``isinstance``) that does not
    call its ``__init__``: there are no parameters of its own to register. ``param_groups``,
    ``state`` and ``defaults`` are the base optimizer's; ``zero_grad`` and
    ``add_param_group`` go to it. Step hooks registered on the wrapper run around the
    wrapper's ``step`` (torch's ``profile_hook_step``), state-dict hooks around its
    ``state_dict`` / ``load_state_dict``.
    """

    def __init__(self, base_optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(f"{type(self).__name__} wraps an optimizer instance (torch.optim.Optimizer), "
                            f"got {type(base_optimizer).__name__}: build it first, e.g. "
                            f"{type(self).__name__}(optforge.AdamW(model.parameters()))")
        self.base_optimizer = base_optimizer
        self._init_hooks()
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True

    def _init_hooks(self) -> None:
        for name in ("step_pre", "step_post", "state_dict_pre", "state_dict_post",
                     "load_state_dict_pre", "load_state_dict_post"):
            self.__dict__.setdefault(f"_optimizer_{name}_hooks", OrderedDict())

    # ---- the base's objects, never copies ---------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.base_optimizer.param_groups = groups

    @property
    def state(self) -> Any:
        """The base optimizer's per-parameter state (``opt.state[p]["exp_avg"]``)."""
        return self.base_optimizer.state

    @state.setter
    def state(self, state: Any) -> None:
        self.base_optimizer.state = state

    @property
    def defaults(self) -> dict[str, Any]:
        """The base optimizer's defaults (what a group added later gets)."""
        return self.base_optimizer.defaults

    @defaults.setter
    def defaults(self, defaults: dict[str, Any]) -> None:
        self.base_optimizer.defaults = defaults

    # ---- plumbing -----------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.base_optimizer.add_param_group(param_group)

    def wrapper_options(self) -> dict[str, Any]:
        """The wrapper's own hyperparameters, for ``repr``."""
        return {}

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.wrapper_options().items())
        base = repr(self.base_optimizer).replace("\n", "\n  ")
        return f"{type(self).__name__}({options}) wrapping\n  {base}"

    def _state_dict_with_hooks(self, build: Any) -> dict[str, Any]:
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state_dict = build()
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def _load_state_dict_with_hooks(self, state_dict: dict[str, Any], load: Any) -> None:
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        load(state_dict)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def state_dict(self) -> dict[str, Any]:
        return self._state_dict_with_hooks(self.base_optimizer.state_dict)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._load_state_dict_with_hooks(state_dict, self.base_optimizer.load_state_dict)

    # pickle / deepcopy: the whole wrapper (base included), less what torch leaves out too: the
    # hooks, and the per-instance ``step`` an lr scheduler patched in (it points at this object).
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()
                if not k.startswith("_optimizer_") and k not in ("step", "_opt_called")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_hooks()
        self._patch_step_function()
