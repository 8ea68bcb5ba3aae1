"""optforge: PyTorch optimizers that are correct, fast, and easy to write."""

from . import schedules
from .base import Optimizer
from .factory import (
    add_optimizer_args,
    create_optimizer,
    optimizer_from_args,
    param_groups_layer_decay,
    param_groups_weight_decay,
    parse_optimizer_args,
)
from .optimizers import (
    ADOPT,
    CAME,
    LAMB,
    MARS,
    SGD,
    SOAP,
    AdaBelief,
    Adafactor,
    Adam,
    AdamW,
    AdamWarmup,
    Adan,
    AdEMAMix,
    AMSGrad,
    Compass,
    Lion,
    LodeW,
    MomentumSGD,
    Muon,
    NAdam,
    Noam,
    Prodigy,
    RAdam,
    ScheduleFreeAdamW,
    ScheduleFreeSGD,
    muon_param_groups,
)
from .registry import OptimInfo, get_optimizer_info, list_optimizers, register
from .schedules import create_scheduler, set_lr
from .state_io import NameLoadReport, load_state_dict_by_name, state_dict_by_name
from .tensorlist import TensorList
from .weight_decay import WEIGHT_DECAY_MODES
from .wrappers import SAM, Lookahead

__version__ = "0.1.0"

__all__ = [
    "Adafactor",
    "CAME",
    "Adan",
    "MARS",
    "ADOPT",
    "SGD",
    "AdEMAMix",
    "Lion",
    "WEIGHT_DECAY_MODES",
    "AMSGrad",
    "AdaBelief",
    "Adam",
    "AdamW",
    "AdamWarmup",
    "Compass",
    "LAMB",
    "Lookahead",
    "SAM",
    "LodeW",
    "MomentumSGD",
    "Muon",
    "NAdam",
    "muon_param_groups",
    "SOAP",
    "NameLoadReport",
    "Noam",
    "Prodigy",
    "Optimizer",
    "RAdam",
    "ScheduleFreeAdamW",
    "ScheduleFreeSGD",
    "TensorList",
    "OptimInfo",
    "add_optimizer_args",
    "create_optimizer",
    "create_scheduler",
    "get_optimizer_info",
    "list_optimizers",
    "load_state_dict_by_name",
    "optimizer_from_args",
    "param_groups_layer_decay",
    "param_groups_weight_decay",
    "parse_optimizer_args",
    "register",
    "schedules",
    "set_lr",
    "state_dict_by_name",
]
