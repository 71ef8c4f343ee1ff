"""Folders in Hugging Face's format (config.json + safetensors) for any model family of ``models.hf_mapping``.

What a family's config fields and tensors are called there is the family's mapping; this module reads and writes the
folders, picks the mapping (by the model's class, or config.json's ``model_type``) and checks what it reads.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from lrm_train.models import hf_mapping
from lrm_train.models.hf_mapping import HFMapping
from lrm_train.models.io import load_state_strict, read_json, read_safetensors, write_weights_folder
from lrm_train.nn import MULTIPLIER_NAMES, LRMConfig


def _mapping_of_model(model: nn.Module) -> HFMapping:
    for mapping in hf_mapping.HF_MAPPINGS:
        if isinstance(model, mapping.MODEL_CLASS):
            return mapping
    raise ValueError(f"no Hugging Face mapping for {type(model).__name__} (see models/hf_mapping.py)")


def _mapping_of_config(config: dict, source: Path) -> HFMapping:
    for mapping in hf_mapping.HF_MAPPINGS:
        if config.get("model_type") == mapping.MODEL_TYPE:
            return mapping
    raise ValueError(f"{source}: model_type={config.get('model_type')!r} is not one lrm_train imports")


def export_hf(
    model: nn.Module, out_dir: str | Path, overwrite: bool = False, sources: Iterable[str | Path] = ()
) -> Path:
    """Write a folder that transformers' ``from_pretrained`` loads.

    ``overwrite`` replaces only a folder lrm_train wrote; ``sources`` (folders the model was read from) never.
    """
    mapping = _mapping_of_model(model)
    config = {"architectures": [mapping.ARCHITECTURE], "model_type": mapping.MODEL_TYPE}
    config.update(mapping.to_hf_config(model.cfg))
    # transformers refuses safetensors files whose "format" is not a framework it knows.
    return write_weights_folder(out_dir, config, mapping.to_hf_state(model), {"format": "pt"}, overwrite, sources)


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(read_json(index)["weight_map"].values()))
        return {k: v for f in files for k, v in read_safetensors(path / f).items()}
    return read_safetensors(path / "model.safetensors")


def import_hf(path: str | Path, lrm: LRMConfig | None = None) -> nn.Module:
    """Build our model from a Hugging Face folder, with any LRM placement, computing the same logits."""
    path = Path(path)
    config_path = path / "config.json"
    config = read_json(config_path)
    mapping = _mapping_of_config(config, config_path)
    model = mapping.MODEL_CLASS(mapping.from_hf_config(config, config_path), lrm)
    state = mapping.from_hf_state({k: v.float() for k, v in _read_hf_weights(path).items()}, model)
    # The learnable multipliers are not in the file: they keep the values they were initialized with.
    for name, tensor in model.state_dict().items():
        if name.rsplit(".", 1)[-1] in MULTIPLIER_NAMES:
            state[name] = tensor
    load_state_strict(model, state, path)
    return model
