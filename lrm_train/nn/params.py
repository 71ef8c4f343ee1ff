"""The vocabulary a model uses to tell the layers above it what each parameter is.

A model family implements ``ParamRoleModel``; ``optim`` (groups, clipping), the engines (ZeRO-3 leaf modules) and the
loggers ask it through this protocol, never by guessing from names, so a new family needs no edit above ``models/``.
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import Enum
from typing import NamedTuple, Protocol

from torch import nn

from lrm_train.nn.parametrization import Parametrization, WidthClass


class ParamClass(str, Enum):
    MATRIX = "matrix"  # attention, SSM and MLP matrices
    EMBEDDING = "embedding"
    LM_HEAD = "lm_head"
    MULTIPLIER = "multiplier"  # learnable scalar/row/column multipliers (lrm_*)
    NORM = "norm"  # RMSNorm weights, the Mamba gated norm's included
    SSM_VECTOR = "ssm_vector"  # A_log, D, dt_bias and the depthwise convolution

    def __str__(self) -> str:
        return self.value


class ParamRole(NamedTuple):
    """What one parameter is: its class and, for a matrix weight or its multipliers, the matrix's role."""

    param_class: ParamClass
    role: str | None = None  # e.g. "attn.q" for q_proj.weight and q_proj.lrm_row; None for norms and SSM vectors
    width: WidthClass | None = None  # how a matrix weight's shape grows with the width; None for every vector


class ParamRoleModel(Protocol):
    """What a model tells the optimizer and the engines about itself."""

    def parameter_roles(self) -> Iterator[tuple[str, ParamRole]]:
        """(parameter name, role) for every parameter, named as ``named_parameters()`` names them."""

    def width_scaling(self) -> tuple[Parametrization, float]:
        """The model's parametrization and its width ratio d / d0 (the optimizer scales LR and WD by them)."""

    def zero3_leaf_modules(self) -> list[type[nn.Module]]:
        """Module types whose forward uses their children's weights directly (gathered whole under ZeRO-3)."""
