"""Reading Hugging Face folders (config.json + safetensors) of any family in ``models.hf_mapping``, and moving one
model's function into another model of the same shape but another LRM placement or init.

Both go through the family's Hugging Face tensors: those hold the function with every learnable multiplier folded in,
so they are the placement-free form of a model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lrm_train.models import hf_mapping
from lrm_train.models.hf_mapping import HFMapping
from lrm_train.models.io import check_tensors, load_state_strict, read_json, read_safetensors
from lrm_train.nn import MULTIPLIER_NAMES, LRMConfig


def mapping_of_model(model: nn.Module) -> HFMapping:
    for mapping in hf_mapping.HF_MAPPINGS:
        if isinstance(model, mapping.MODEL_CLASS):
            return mapping
    raise ValueError(f"no Hugging Face mapping for {type(model).__name__} (see models/hf_mapping.py)")


def _mapping_of_config(config: dict, source: Path) -> HFMapping:
    if "model_type" not in config:
        raise ValueError(f"{source}: model_type is missing")
    known = {mapping.MODEL_TYPE: mapping for mapping in hf_mapping.HF_MAPPINGS}
    mapping = known.get(config["model_type"])
    if mapping is None:
        raise ValueError(
            f"{source}: model_type={config['model_type']!r} is not one lrm_train imports ({', '.join(known)})"
        )
    # Same model type, other head (e.g. the base model without its LM head): other tensors.
    architectures = config.get("architectures") or [mapping.ARCHITECTURE]
    if architectures != [mapping.ARCHITECTURE]:
        raise ValueError(f"{source}: architectures={architectures!r}, expected [{mapping.ARCHITECTURE!r}]")
    return mapping


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if not index.exists():
        return read_safetensors(path / "model.safetensors")
    files = read_json(index).get("weight_map")
    if isinstance(files, dict):
        return {k: v for file in sorted(set(files.values())) for k, v in read_safetensors(path / file).items()}
    raise ValueError(f"{index}: no weight_map")


def _load_hf_state(model: nn.Module, mapping: HFMapping, tensors: dict[str, torch.Tensor], source: Path) -> None:
    state = mapping.from_hf_state({k: v.float() for k, v in tensors.items()}, model)
    # The learnable multipliers are not among those tensors: they keep the values they were initialized with.
    for name, tensor in model.state_dict().items():
        if name.rsplit(".", 1)[-1] in MULTIPLIER_NAMES:
            state[name] = tensor
    load_state_strict(model, state, source)


def import_hf(path: str | Path, lrm: LRMConfig | str | None = None) -> nn.Module:
    """Build our model from a Hugging Face folder, with any LRM placement, computing the same logits.

    ``lrm``: an ``LRMConfig`` or a placement name. A folder that does not hold exactly the tensors of its config
    (or of another architecture) is refused with one ValueError line naming it and the first culprit.
    """
    path = Path(path)
    lrm = LRMConfig(placement=lrm) if isinstance(lrm, str) else lrm
    config_path = path / "config.json"
    config = read_json(config_path)
    mapping = _mapping_of_config(config, config_path)
    cfg = mapping.from_hf_config(config, config_path)
    tensors = _read_hf_weights(path)
    with torch.device("meta"):  # names and shapes only: costs no memory
        check_tensors(tensors, mapping.to_hf_state(mapping.MODEL_CLASS(cfg, LRMConfig("none"))), path)
    model = mapping.MODEL_CLASS(cfg, lrm)
    _load_hf_state(model, mapping, tensors, path)
    return model


def transfer_function(source: nn.Module, target: nn.Module, source_path: Path) -> None:
    """Give ``target`` the function of ``source``, a model of the same family and config but possibly another LRM
    placement or init: ``target``'s learnable multipliers keep their initial values, its weights absorb the rest."""
    mapping = mapping_of_model(source)
    with torch.no_grad():
        tensors = {k: v.detach().to("cpu", torch.float32) for k, v in mapping.to_hf_state(source).items()}
    _load_hf_state(target, mapping, tensors, source_path)
