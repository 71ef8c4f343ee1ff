"""Primitives: the learnable-multiplier layers, norms, the loss, and the parameter vocabulary (classes, roles) a model
declares itself in. Nothing here knows about Falcon-H1."""

from lrm_train.nn.loss import LMLoss, lm_loss
from lrm_train.nn.multipliers import (
    INITS,
    MULTIPLIER_NAMES,
    PLACEMENTS,
    Init,
    Learnable,
    LRMConfig,
    MultipliedEmbedding,
    MultipliedLinear,
    MultipliedMatrix,
    Placement,
    fused_linear,
    learned_scales_by_role,
    merge_multipliers_,
)
from lrm_train.nn.norms import GatedRMSNorm, RMSNorm
from lrm_train.nn.parametrization import Parametrization, WidthClass
from lrm_train.nn.params import ParamClass, ParamRole, ParamRoleModel

__all__ = [
    "INITS",
    "MULTIPLIER_NAMES",
    "PLACEMENTS",
    "GatedRMSNorm",
    "Init",
    "LMLoss",
    "LRMConfig",
    "Learnable",
    "MultipliedEmbedding",
    "MultipliedLinear",
    "MultipliedMatrix",
    "ParamClass",
    "ParamRole",
    "ParamRoleModel",
    "Parametrization",
    "Placement",
    "RMSNorm",
    "WidthClass",
    "fused_linear",
    "learned_scales_by_role",
    "lm_loss",
    "merge_multipliers_",
]
