"""optforge: PyTorch optimizers that are correct, fast, and easy to write."""

from .base import Optimizer
from .optimizers import (
    SGD,
    AdaBelief,
    Adam,
    AdamW,
    AdamWarmup,
    AMSGrad,
    Compass,
    LodeW,
    MomentumSGD,
    Noam,
    RAdam,
)
from .tensorlist import TensorList
from .weight_decay import WEIGHT_DECAY_MODES

__version__ = "0.1.0"

__all__ = [
    "SGD",
    "WEIGHT_DECAY_MODES",
    "AMSGrad",
    "AdaBelief",
    "Adam",
    "AdamW",
    "AdamWarmup",
    "Compass",
    "LodeW",
    "MomentumSGD",
    "Noam",
    "Optimizer",
    "RAdam",
    "TensorList",
]
