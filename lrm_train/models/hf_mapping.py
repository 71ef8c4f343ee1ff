"""What ``lrm_train.hf`` needs to know of a model family to read and write it in Hugging Face's format.

A family's mapping is a module with the names of ``HFMapping`` (``models/falcon_h1_hf.py`` for Falcon-H1); listing
it in ``HF_MAPPINGS`` is all a new family needs, ``lrm_train.hf`` itself stays the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from lrm_train.models import falcon_h1_hf


class HFMapping(Protocol):
    MODEL_TYPE: str  # config.json's "model_type"
    ARCHITECTURE: str  # the transformers class named in config.json's "architectures"
    MODEL_CLASS: type[nn.Module]  # built as MODEL_CLASS(model config, LRMConfig); keeps its config as .cfg

    def to_hf_config(self, cfg: Any) -> dict:
        """config.json's fields for this model config (model_type and architectures are added by the caller)."""

    def from_hf_config(self, config: dict, source: Path) -> Any:
        """The model config of a config.json; one ValueError line naming ``source`` for what cannot be imported."""

    def to_hf_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's function as Hugging Face tensors, every learnable multiplier folded in."""

    def from_hf_state(self, state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """Hugging Face tensors, with the names and shapes ``to_hf_state`` gives, as ``model``'s plain weights."""


HF_MAPPINGS: tuple[HFMapping, ...] = (falcon_h1_hf,)
