"""Optimization: parameter classes (the one contract), AdamW/Muon construction, schedules."""

from lrm_train.optim.builder import (
    ClassHyper,
    CombinedOptimizer,
    OptimConfig,
    build_optimizer,
    class_table,
    format_table,
    set_learning_rates,
)
from lrm_train.optim.muon import Muon, newton_schulz
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
    "ClassHyper",
    "CombinedOptimizer",
    "Muon",
    "OptimConfig",
    "ParamClass",
    "ParamRole",
    "ParamRoleModel",
    "ScheduleConfig",
    "batch_fraction",
    "build_optimizer",
    "class_table",
    "classify_parameters",
    "format_table",
    "is_clipped",
    "lr_factor",
    "newton_schulz",
    "parameter_roles",
    "set_learning_rates",
]
