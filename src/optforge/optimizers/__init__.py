"""The optimizers, one algorithm family per file."""

from .adabelief import AdaBelief
from .adadelta import Adadelta
from .adafactor import Adafactor
from .adagrad import Adagrad
from .adam import Adam, AdamW, AMSGrad
from .adam_mini import AdamMini
from .adamax import Adamax
from .adan import Adan
from .ademamix import AdEMAMix
from .adopt import ADOPT
from .asgd import ASGD
from .came import CAME
from .compass import Compass, LodeW
from .galore import GaLoreAdamW
from .kron import PSGDKron
from .lamb import LAMB
from .lbfgs import LBFGS
from .lion import Lion
from .mars import MARS
from .muon import Muon, muon_param_groups
from .nadam import NAdam
from .normuon import NorMuon
from .prodigy import Prodigy
from .radam import RAdam
from .rmsprop import RMSprop
from .rprop import Rprop
from .schedule_free import ScheduleFreeAdamW, ScheduleFreeSGD
from .sgd import SGD, MomentumSGD
from .shampoo import Shampoo
from .soap import SOAP
from .sparse_adam import SparseAdam
from .warmup import AdamWarmup, Noam

__all__ = ["Adadelta", "Adafactor", "Adagrad", "CAME", "Muon", "muon_param_groups", "SOAP", "Shampoo",
           "LAMB", "Adan", "MARS", "Prodigy",
           "ScheduleFreeAdamW", "ScheduleFreeSGD",
           "ADOPT", "ASGD", "AdEMAMix", "Lion",
           "SGD", "AMSGrad", "AdaBelief", "Adam", "Adamax", "AdamW", "AdamWarmup", "Compass", "LodeW",
           "MomentumSGD", "NAdam", "Noam", "RAdam", "RMSprop", "Rprop"]
__all__ += ["SparseAdam", "LBFGS", "NorMuon", "AdamMini", "GaLoreAdamW", "PSGDKron"]
