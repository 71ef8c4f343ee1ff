"""Models: the Falcon-H1 hybrid, its config and presets."""

from lrm_train.models.config import PRESETS, FalconH1Config, KernelBackend, preset, width_family
from lrm_train.models.falcon_h1 import MATRIX_ROLES, FalconH1LM, static_transplant

__all__ = [
    "MATRIX_ROLES",
    "PRESETS",
    "FalconH1Config",
    "FalconH1LM",
    "KernelBackend",
    "preset",
    "static_transplant",
    "width_family",
]
