"""Optimization: parameter classes (the one contract), AdamW/Muon construction, schedules."""

from lrm_train.optim.adamw import AdamW, adamw_update_
from lrm_train.optim.builder import (
    ClassHyper,
    CombinedOptimizer,
    OptimConfig,
    OptimizerName,
    RoleHyper,
    build_optimizer,
    class_table,
    format_table,
    make_optimizer,
    set_learning_rates,
)
from lrm_train.optim.muon import (
    AdjustLR,
    Muon,
    NSDtype,
    adjusted_lr,
    decoupled_step_,
    muon_direction_,
    newton_schulz,
    ns_dtype,
    orthogonalize,
)
from lrm_train.optim.param_classes import (
    ParamClass,
    ParamRole,
    ParamRoleModel,
    classify_parameters,
    is_clipped,
    parameter_roles,
)
from lrm_train.optim.schedule import ScheduleConfig, batch_fraction, lr_factor

__all__ = [
    "AdamW",
    "AdjustLR",
    "ClassHyper",
    "CombinedOptimizer",
    "Muon",
    "NSDtype",
    "OptimConfig",
    "OptimizerName",
    "ParamClass",
    "ParamRole",
    "ParamRoleModel",
    "RoleHyper",
    "ScheduleConfig",
    "adamw_update_",
    "adjusted_lr",
    "batch_fraction",
    "build_optimizer",
    "class_table",
    "classify_parameters",
    "decoupled_step_",
    "format_table",
    "is_clipped",
    "lr_factor",
    "make_optimizer",
    "muon_direction_",
    "newton_schulz",
    "ns_dtype",
    "orthogonalize",
    "parameter_roles",
    "set_learning_rates",
]
