"""torch's ``OptimizerInfo`` records (``torch.testing._internal.common_optimizers``) for every
registered optforge optimizer and for the Lookahead and SAM wrappers, so the checks of
``test_torch_optiminfo.py`` run over optforge as torch's own suite runs over ``torch.optim``.

Where torch has the same optimizer (SGD, Adam, AdamW, AMSGrad = Adam(amsgrad=True), RAdam,
Adafactor, Muon) its input and error-input functions are reused as they are. Every other
optimizer gets inputs derived from the registry: its defaults, the table kwargs of
``helpers.OPTIMIZER_KWARGS`` (which exercise its state within a few steps), weight decay in
both modes, ``maximize``, each boolean option flipped, and the extra settings in ``VARIANTS``.
A newly registered optimizer is therefore covered with no entry here.
"""

from __future__ import annotations

import inspect
import re

import pytest
import torch

import optforge
from helpers import OPTIMIZER_KWARGS, optimizer_infos

co = pytest.importorskip("torch.testing._internal.common_optimizers",
                         reason="torch's optimizer test records need the expecttest package")
# Importing torch's test utilities freezes torch.backends flags for the whole process (torch's
# suite wants that); give them back, so that other tests in the same run may still set them.
torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
OptimizerInfo, OptimizerInput = co.OptimizerInfo, co.OptimizerInput
ErrorOptimizerInput, OptimizerErrorEnum = co.ErrorOptimizerInput, co.OptimizerErrorEnum

# registry name -> torch's (inputs, error inputs) for the same algorithm
TORCH_COUNTERPARTS = {
    "sgd": (co.optim_inputs_func_sgd, co.optim_error_inputs_func_sgd),
    "adam": (co.optim_inputs_func_adam, co.optim_error_inputs_func_adam),
    "adamw": (co.optim_inputs_func_adamw, co.optim_error_inputs_func_adamw),
    "amsgrad": (co.optim_inputs_func_adam, co.optim_error_inputs_func_adam),
    "radam": (co.optim_inputs_func_radam, co.optim_error_inputs_func_radam),
    "adafactor": (co.optim_inputs_func_adafactor, co.optim_error_inputs_func_adafactor),
    "muon": (co.optim_inputs_func_muon, co.optim_error_inputs_func_muon),
    "sparse_adam": (co.optim_inputs_func_sparseadam, co.optim_error_inputs_func_sparseadam),
    "lbfgs": (co.optim_inputs_func_lbfgs, co.optim_error_inputs_func_lbfgs),
    "nadam": (co.optim_inputs_func_nadam, co.optim_error_inputs_func_nadam),
    "rmsprop": (co.optim_inputs_func_rmsprop, co.optim_error_inputs_func_rmsprop),
    "adagrad": (co.optim_inputs_func_adagrad, co.optim_error_inputs_func_adagrad),
    "adamax": (co.optim_inputs_func_adamax, co.optim_error_inputs_func_adamax),
    "adadelta": (co.optim_inputs_func_adadelta, co.optim_error_inputs_func_adadelta),
    "rprop": (co.optim_inputs_func_rprop, co.optim_error_inputs_func_rprop),
    "asgd": (co.optim_inputs_func_asgd, co.optim_error_inputs_func_asgd),
}
# torch's own infos, by class name: their settings for the sparse-gradient test
TORCH_INFOS = {i.optim_cls.__name__.lower(): i for i in co.optim_db}

# Settings the derived inputs cannot guess (non-boolean options), on top of the table kwargs.
VARIANTS: dict[str, list[tuple[str, dict]]] = {
    "adafactor": [("eps_placement=clamp", dict(eps_placement="clamp")), ("lr, no relative step",
                                                                          dict(relative_step=False))],
    "compass": [("amp_fac", dict(amp_fac=1.5))],
    "adam_warmup": [("amsgrad warmup", dict(amsgrad=True, warmup=2))],
    "ademamix": [("no warmups", dict(alpha_warmup=0, beta3_warmup=0))],
    "adopt": [("clip_exponent", dict(clip_exponent=0.3))],
    "muon": [("match_rms_adamw", dict(adjust_lr_fn="match_rms_adamw")),
             ("ns_dtype=param", dict(ns_dtype="param"))],
    "prodigy": [("beta3, d_coef, growth_rate", dict(beta3=0.9, d_coef=0.5, growth_rate=1.02))],
    "schedule_free_adamw": [("r, weight_lr_power", dict(r=0.5, weight_lr_power=1.0))],
    "schedule_free_sgd": [("r, weight_lr_power", dict(r=0.5, weight_lr_power=1.0))],
    "soap": [("shampoo_beta, eps", dict(shampoo_beta=0.9, eps=1e-6))],
    "mars": [("timm variant", dict(variant="timm")),
             ("1-D hyperparameters", dict(lr_1d=1e-3, betas_1d=(0.8, 0.9), weight_decay_1d=0.0))],
    "lookahead": [("k=2, alpha=0.8", dict(k=2, alpha=0.8))],
    "sam": [("adaptive, eta, rho", dict(adaptive=True, eta=0.01, rho=0.5))],
}
# Options never flipped as "variants": cliquey flags and the ones covered by their own inputs.
NOT_VARIANTS = {"maximize", "fused", "foreach", "differentiable", "capturable"}
# Booleans with one valid value: MARS takes only the approximate gradient difference.
ONE_VALUE = {"mars": {"is_approx"}}


def _derived_inputs(name: str, defaults: dict, tuned: dict):
    """Inputs in torch's style from an optimizer's registry defaults (no cliquey kwargs)."""
    flips = [k for k, v in defaults.items()
             if isinstance(v, bool) and k not in NOT_VARIANTS | ONE_VALUE.get(name, set())]
    other_mode = "coupled" if defaults.get("weight_decay_mode") == "decoupled" else "decoupled"

    def inputs(device, dtype=None):
        out = [OptimizerInput(None, {}, "default"),
               OptimizerInput(None, dict(tuned), "table kwargs"),
               OptimizerInput(None, {**tuned, "weight_decay": 0.1}, "nonzero weight_decay"),
               OptimizerInput(None, {**tuned, "weight_decay": 0.1, "maximize": True}, "maximize")]
        if "weight_decay_mode" in defaults:
            out.append(OptimizerInput(None, {**tuned, "weight_decay": 0.1, "weight_decay_mode": other_mode},
                                      f"weight_decay_mode={other_mode}"))
        out += [OptimizerInput(None, {**tuned, k: not tuned.get(k, defaults[k])}, f"{k} flipped")
                for k in flips]
        out += [OptimizerInput(None, {**tuned, **kw}, desc) for desc, kw in VARIANTS.get(name, [])]
        return out

    return inputs


def _derived_error_inputs(defaults: dict, cls, extra=()):
    """Error inputs from the registry: torch's errors common to every optimizer, an invalid
    value of each standard hyperparameter it has, a misspelled keyword, and the inputs its
    class refuses at the first step (complex parameters, sparse gradients)."""
    bad = dict(lr=-1.0, weight_decay=-1.0, momentum=-0.5, eps=-1.0, weight_decay_mode="L2")
    if isinstance(defaults.get("betas"), tuple):
        bad["betas"] = (1.0, *defaults["betas"][1:])

    def error_inputs(device, dtype):
        out = co.get_error_inputs_for_all_optims(device, dtype)
        for k, v in bad.items():
            if k in defaults:
                shown = "betas[0]=1.0" if k == "betas" else f"{k}={v!r}"
                out.append(ErrorOptimizerInput(OptimizerInput(None, {k: v}, f"invalid {k}"),
                                               error_type=ValueError,
                                               error_regex=re.escape(f"invalid {shown}")))
        out.append(ErrorOptimizerInput(OptimizerInput(None, {"weight_decya": 0.1}, "misspelled keyword"),
                                       error_type=TypeError,
                                       error_regex="unexpected keyword argument 'weight_decya'"))
        sparse = torch.nn.Parameter(torch.randn(3, 2, device=device, dtype=dtype))
        sparse.grad = torch.randn(3, 2, device=device, dtype=dtype).to_sparse()
        out.append(ErrorOptimizerInput(OptimizerInput([sparse], {}, "sparse gradient"),
                                       error_on=OptimizerErrorEnum.STEP_ERROR, error_type=RuntimeError,
                                       error_regex="does not support sparse gradients"))
        if not getattr(cls, "supports_complex", True):
            z = torch.randn(2, 3, device=device, dtype=torch.complex64, requires_grad=True)
            z.grad = torch.randn_like(z)
            out.append(ErrorOptimizerInput(OptimizerInput([z], {}, "complex parameter"),
                                           error_on=OptimizerErrorEnum.STEP_ERROR, error_type=ValueError,
                                           error_regex="does not support complex parameters"))
        return out + [e(device, dtype) for e in extra]

    return error_inputs


def accepts(cls, keyword: str) -> bool:
    return keyword in inspect.signature(cls).parameters


def native_fused(cls) -> bool:
    """Whether ``fused=True`` runs a hand-written kernel (torch's own fused SGD/Adam/AdamW)
    with the defaults. The generated kernels of the other optimizers compile with
    ``torch.compile`` (seconds each): test_paths.py checks them, not this suite."""
    if not accepts(cls, "fused"):
        return False
    try:
        opt = cls([torch.zeros(2, 2, requires_grad=True)], fused=True)
    except ValueError:
        return False
    return bool(opt.native_fused(opt.param_groups[0]))


def runs_native_fused(info, kwargs: dict) -> bool:
    """Whether ``kwargs`` (with fused=True) run torch's own fused kernel, not a generated one."""
    opt = info.optim_cls([torch.zeros(2, 2, requires_grad=True)], **kwargs)
    opt = getattr(opt, "base_optimizer", opt)
    return bool(opt.native_fused(opt.param_groups[0]))


class OptforgeInfo(OptimizerInfo):
    """torch's record plus the registry name (the name tests and known failures use)."""

    def __init__(self, registry_name: str, cls, wrapper_options: tuple[str, ...] = (), **kwargs):
        super().__init__(cls, **kwargs)
        self.registry_name = registry_name
        #: constructor options of a wrapper itself (not param-group entries of its base)
        self.wrapper_options = wrapper_options

    @property
    def name(self) -> str:
        return self.registry_name


def _impls(cls) -> tuple[str, ...]:
    """The cliquey flags (foreach / fused / differentiable) an optimizer accepts today."""
    flags = tuple(f for f in ("foreach", "differentiable") if accepts(cls, f))
    return flags + (("fused",) if native_fused(cls) else ())


def registry_info(info) -> OptforgeInfo:
    tuned = OPTIMIZER_KWARGS.get(info.name, {"lr": 1e-2})
    if info.name in TORCH_COUNTERPARTS:
        torch_inputs, errors = TORCH_COUNTERPARTS[info.name]

        def inputs(device, dtype=None):   # torch's, then optforge's own options
            extra = [OptimizerInput(None, dict(kw), desc) for desc, kw in VARIANTS.get(info.name, [])]
            return torch_inputs(device, dtype) + extra
    else:
        inputs = _derived_inputs(info.name, info.defaults, tuned)
        errors = _derived_error_inputs(info.defaults, info.cls)
    impls = _impls(info.cls)
    # torch's record of the same algorithm (by class name: SparseAdam is "sparse_adam" here)
    same = TORCH_INFOS.get(info.cls.__name__.lower()) if info.name in TORCH_COUNTERPARTS else None
    return OptforgeInfo(info.name, info.cls, optim_inputs_func=inputs, optim_error_inputs_func=errors,
                        supported_impls=impls, supports_fused_on=("cpu",) if "fused" in impls else (),
                        supports_sparse=getattr(info.cls, "supports_sparse", False),
                        metadata_for_sparse=same.metadata_for_sparse if same else ({}, []),
                        supports_complex=getattr(info.cls, "supports_complex", True),
                        # the natures torch records: LBFGS needs a closure and one param group,
                        # SparseAdam takes sparse gradients only
                        step_requires_closure=bool(same and same.step_requires_closure),
                        supports_param_groups=not same or same.supports_param_groups,
                        only_supports_sparse_grads=bool(same and same.only_supports_sparse_grads))


# ---- the wrappers, as constructors taking params ------------------------------------------------
def Lookahead_AdamW(params, k: int = 3, alpha: float = 0.5, **kwargs):  # noqa: N802 (a class-like factory)
    return optforge.Lookahead(optforge.AdamW(params, **kwargs), k=k, alpha=alpha)


def SAM_SGD(params, rho: float = 0.05, adaptive: bool = False, eta: float = 0.0, **kwargs):  # noqa: N802
    return optforge.SAM(optforge.SGD(params, **kwargs), rho=rho, adaptive=adaptive, eta=eta)


def _invalid(kwargs: dict, regex: str):
    return lambda device, dtype: ErrorOptimizerInput(OptimizerInput(None, kwargs, f"invalid {kwargs}"),
                                                     error_type=ValueError, error_regex=regex)


def wrapper_infos() -> list[OptforgeInfo]:
    adamw = optforge.get_optimizer_info("adamw")
    sgd = optforge.get_optimizer_info("sgd")
    lookahead_defaults = {**adamw.defaults, "k": 3, "alpha": 0.5}
    sam_defaults = {**sgd.defaults, "adaptive": False}
    return [
        OptforgeInfo("lookahead", Lookahead_AdamW, wrapper_options=("k", "alpha"),
                     optim_inputs_func=_derived_inputs("lookahead", lookahead_defaults, {"lr": 1e-2}),
                     optim_error_inputs_func=_derived_error_inputs(
                         adamw.defaults, optforge.AdamW,
                         extra=(_invalid({"k": 0}, r"invalid k=0"),
                                _invalid({"alpha": 1.5}, r"invalid alpha=1\.5"))),
                     supported_impls=("fused",), supports_fused_on=("cpu",)),
        OptforgeInfo("sam", SAM_SGD, wrapper_options=("rho", "adaptive", "eta"), step_requires_closure=True,
                     optim_inputs_func=_derived_inputs("sam", sam_defaults, {"lr": 1e-2, "momentum": 0.9}),
                     optim_error_inputs_func=_derived_error_inputs(
                         sgd.defaults, optforge.SGD,
                         extra=(_invalid({"rho": -1.0}, r"invalid rho=-1\.0"),
                                _invalid({"eta": 0.1}, r"invalid eta=0\.1"))),
                     supported_impls=("fused",), supports_fused_on=("cpu",)),
    ]


#: every record the suite runs over: the registry's optforge optimizers, then the wrappers
OPTIM_INFOS: list[OptforgeInfo] = [registry_info(i) for i in optimizer_infos(generic=False)] + wrapper_infos()
