"""Falcon-H1 in Hugging Face's format: transformers' ``FalconH1ForCausalLM`` config fields and tensor names.

Export folds every learnable multiplier into the weights: the Hugging Face model keeps only its fixed muP multipliers
(the config floats), so each matrix is written as ``W_eff / m_hf`` where ``m_hf`` is the config's factor for that
matrix. Import loads the weights as the plain ``W`` of a freshly built model with any placement: its learnable
multipliers start at their initial values, which reproduce the Hugging Face function exactly (see nn.multipliers).

This module is Falcon-H1's ``models.hf_mapping.HFMapping``; ``lrm_train.hf`` does the folder work.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from lrm_train.models.config import INIT_FIELDS, RUNTIME_FIELDS, FalconH1Config
from lrm_train.models.falcon_h1 import FalconH1LM
from lrm_train.nn import MULTIPLIER_NAMES

MODEL_TYPE = "falcon_h1"
ARCHITECTURE = "FalconH1ForCausalLM"
MODEL_CLASS = FalconH1LM

# Config fields copied as they are, in both directions.
_SHARED_FIELDS = [
    f.name
    for f in dataclasses.fields(FalconH1Config)
    if f.name not in ("head_dim", "rope_theta", *INIT_FIELDS, *RUNTIME_FIELDS)
]
# Hugging Face options our model does not implement, with the only value we accept.
_REQUIRED = {
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "projectors_bias": False,
    "mamba_proj_bias": False,
    "mamba_conv_bias": True,
}
# Fields a config.json may leave out: transformers' default for them is what we derive. Every other field is needed.
_OPTIONAL_FIELDS = ("mamba_d_head", "ssm_multipliers", "mlp_multipliers")
# The Mamba in_proj is one matrix in Hugging Face's model and five (one per role) in ours, in this order.
_SECTIONS = ("z", "x", "B", "C", "dt")


def _hf_name(name: str) -> str:
    return name if name.startswith("lm_head") else f"model.{name}"


def to_hf_config(cfg: FalconH1Config) -> dict:
    config = {name: getattr(cfg, name) for name in _SHARED_FIELDS}
    config.update(cfg.hf_multipliers())  # the forward at this width, whatever the parametrization
    config.update(_REQUIRED)
    config.update(
        head_dim=cfg.attention_head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        rope_theta=cfg.rope_theta,  # where transformers before 5.0 reads it
        initializer_range=cfg.init_std,
    )
    return config


def _is_default_dt_limit(limit) -> bool:
    if limit is None:
        return True
    low, high = limit
    infinite = high is None or high == {"__float__": "Infinity"} or (isinstance(high, float) and math.isinf(high))
    return float(low) == 0.0 and infinite


def from_hf_config(config: dict, source: Path) -> FalconH1Config:
    missing = next((name for name in _SHARED_FIELDS if name not in config and name not in _OPTIONAL_FIELDS), None)
    if missing:
        raise ValueError(f"{source}: {missing} is missing")
    for key, value in _REQUIRED.items():
        if config.get(key, value) != value:
            raise ValueError(f"{source}: {key}={config[key]!r} is not supported (only {value!r})")
    if not _is_default_dt_limit(config.get("time_step_limit")):
        raise ValueError(f"{source}: time_step_limit={config['time_step_limit']!r} is not supported (only (0, inf))")
    rope = config.get("rope_parameters") or {"rope_type": "default", "rope_theta": config.get("rope_theta", 1e4)}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{source}: rope_type={rope['rope_type']!r} is not supported (only 'default')")
    fields = {name: config[name] for name in _SHARED_FIELDS if config.get(name) is not None}
    if config.get("mamba_d_ssm") is None:
        fields["mamba_d_ssm"] = int(config.get("mamba_expand", 2) * config["hidden_size"])
    if config.get("mamba_d_head", "auto") == "auto":
        fields["mamba_d_head"] = fields["mamba_d_ssm"] // config["mamba_n_heads"]
    fields["num_key_value_heads"] = config.get("num_key_value_heads") or config["num_attention_heads"]
    try:
        return FalconH1Config(
            **fields,
            head_dim=config.get("head_dim"),
            rope_theta=float(rope["rope_theta"]),
            init_std=config.get("initializer_range", 0.02),
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None


@torch.no_grad()
def to_hf_state(model: FalconH1LM) -> dict[str, torch.Tensor]:
    """The model's function as Hugging Face tensors, every learnable multiplier folded in."""
    cfg = model.cfg
    state: dict[str, torch.Tensor] = {}
    for name, matrix in model.matrices().items():
        state[f"{name}.weight"] = matrix.effective_weight() / cfg.matrix_multiplier(matrix.role)
    matrix_params = {f"{name}.{p}" for name in model.matrices() for p in ("weight", *MULTIPLIER_NAMES)}
    for name, param in model.named_parameters():
        if name not in matrix_params:
            state[name] = param
    for i in range(cfg.num_hidden_layers):
        prefix = f"layers.{i}.mamba.in_proj"
        state[f"{prefix}.weight"] = torch.cat([state.pop(f"{prefix}.{s}.weight") for s in _SECTIONS])
    return {_hf_name(k): v.detach().float().contiguous() for k, v in state.items()}


def from_hf_state(state: dict[str, torch.Tensor], model: FalconH1LM) -> dict[str, torch.Tensor]:
    """Hugging Face tensors (names and shapes as ``to_hf_state`` writes them) as ``model``'s plain weights."""
    ours = {name.removeprefix("model."): tensor for name, tensor in state.items()}
    for i, layer in enumerate(model.layers):
        in_proj = ours.pop(f"layers.{i}.mamba.in_proj.weight")
        for section, weight in zip(_SECTIONS, in_proj.split(layer.mamba.section_sizes)):
            ours[f"layers.{i}.mamba.in_proj.{section}.weight"] = weight
    return ours
