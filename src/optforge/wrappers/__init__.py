"""Optimizers that wrap an optimizer: :class:`Lookahead` and :class:`SAM` (ASAM with
``adaptive=True``). Each wraps any ``torch.optim.Optimizer`` instance, optforge's or torch's,
and shares its param groups, so lr schedulers and ``GradScaler`` work on the wrapper."""

from .base import OptimizerWrapper
from .lookahead import Lookahead
from .sam import SAM

__all__ = ["SAM", "Lookahead", "OptimizerWrapper"]
