"""The optimizers, one algorithm family per file."""

from .adabelief import AdaBelief
from .adam import Adam, AdamW, AMSGrad
from .compass import Compass, LodeW
from .radam import RAdam
from .sgd import SGD, MomentumSGD
from .warmup import AdamWarmup, Noam

__all__ = ["SGD", "AMSGrad", "AdaBelief", "Adam", "AdamW", "AdamWarmup", "Compass", "LodeW",
           "MomentumSGD", "Noam", "RAdam"]
