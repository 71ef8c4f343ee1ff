"""Parameter classes: the single place that says what each parameter of the model is.

Every other component - the optimizer's groups, gradient clipping, the loggers, the engines - asks here and never
guesses from a name again. ``classify_parameters`` asserts that every parameter gets exactly one class.
"""

from __future__ import annotations

from enum import Enum

from torch import nn

from lrm_train.models.falcon_h1 import FalconH1LM, Mamba2Mixer
from lrm_train.nn import MULTIPLIER_NAMES, GatedRMSNorm, MultipliedMatrix, RMSNorm


class ParamClass(str, Enum):
    MATRIX = "matrix"  # attention, SSM and MLP matrices
    EMBEDDING = "embedding"
    LM_HEAD = "lm_head"
    MULTIPLIER = "multiplier"  # learnable scalar/row/column multipliers (lrm_*)
    NORM = "norm"  # RMSNorm weights, the Mamba gated norm's included
    SSM_VECTOR = "ssm_vector"  # A_log, D, dt_bias and the depthwise convolution

    def __str__(self) -> str:
        return self.value


def _module_classes(module: nn.Module) -> dict[str, ParamClass]:
    """The classes of the parameters a module owns directly (not those of its children)."""
    if isinstance(module, MultipliedMatrix):
        weight = {"embedding": ParamClass.EMBEDDING, "lm_head": ParamClass.LM_HEAD}.get(module.role, ParamClass.MATRIX)
        return {"weight": weight} | {
            n: ParamClass.MULTIPLIER for n in MULTIPLIER_NAMES if getattr(module, n) is not None
        }
    if isinstance(module, (RMSNorm, GatedRMSNorm)):
        return {"weight": ParamClass.NORM}
    if isinstance(module, Mamba2Mixer):
        return {name: ParamClass.SSM_VECTOR for name in ("A_log", "D", "dt_bias")}
    if isinstance(module, nn.Conv1d):  # only the Mamba mixer's depthwise convolution
        return {name: ParamClass.SSM_VECTOR for name, _ in module.named_parameters(recurse=False)}
    return {}


def classify_parameters(model: FalconH1LM) -> dict[str, ParamClass]:
    """Parameter name -> class, for every parameter of ``model`` (unwrapped), each exactly once."""
    classes: dict[str, ParamClass] = {}
    for module_name, module in model.named_modules():
        for param_name, cls in _module_classes(module).items():
            name = f"{module_name}.{param_name}" if module_name else param_name
            assert name not in classes, f"parameter {name} was classified twice"
            classes[name] = cls
    names = [name for name, _ in model.named_parameters()]
    unclassified = sorted(set(names) - set(classes))
    assert not unclassified, f"parameters without a class: {', '.join(unclassified)}"
    stale = sorted(set(classes) - set(names))
    assert not stale, f"classified names that are not parameters: {', '.join(stale)}"
    return {name: classes[name] for name in names}
