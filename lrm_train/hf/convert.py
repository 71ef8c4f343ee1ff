"""Conversion to and from the Hugging Face ``FalconH1ForCausalLM`` folder format (config.json + safetensors).

Export folds every learnable multiplier into the weights: the Hugging Face model keeps only its fixed muP multipliers
(the config floats), so each matrix is written as ``W_eff / m_hf`` where ``m_hf`` is the config's factor for that
matrix. Import loads the weights as the plain ``W`` of a freshly built model with any placement: its learnable
multipliers start at their initial values, which reproduce the Hugging Face function exactly (see nn.multipliers).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from pathlib import Path

import torch

from lrm_train.models import FalconH1Config, FalconH1LM
from lrm_train.models.io import load_state_strict, read_json, read_safetensors, write_weights_folder
from lrm_train.nn import MULTIPLIER_NAMES, LRMConfig

# Config fields copied as they are, in both directions.
_SHARED_FIELDS = [
    f.name for f in dataclasses.fields(FalconH1Config) if f.name not in ("head_dim", "rope_theta", "init_std")
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
_SECTIONS = ("z", "x", "B", "C", "dt")


def _hf_name(name: str) -> str:
    return name if name.startswith("lm_head") else f"model.{name}"


def hf_config(cfg: FalconH1Config) -> dict:
    config = {name: getattr(cfg, name) for name in _SHARED_FIELDS}
    config.update(_REQUIRED)
    config.update(
        architectures=["FalconH1ForCausalLM"],
        model_type="falcon_h1",
        head_dim=cfg.attention_head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        initializer_range=cfg.init_std,
    )
    return config


def _is_default_dt_limit(limit) -> bool:
    if limit is None:
        return True
    low, high = limit
    infinite = high is None or high == {"__float__": "Infinity"} or (isinstance(high, float) and math.isinf(high))
    return float(low) == 0.0 and infinite


def config_from_hf(config: dict, source: Path) -> FalconH1Config:
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
def hf_state_dict(model: FalconH1LM) -> dict[str, torch.Tensor]:
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


def export_hf(
    model: FalconH1LM, out_dir: str | Path, overwrite: bool = False, sources: Iterable[str | Path] = ()
) -> Path:
    """Write a folder that ``transformers.FalconH1ForCausalLM.from_pretrained`` loads.

    ``overwrite`` replaces only a folder lrm_train wrote; ``sources`` (folders the model was read from) never.
    """
    # transformers refuses safetensors files whose "format" is not a framework it knows.
    return write_weights_folder(
        out_dir, hf_config(model.cfg), hf_state_dict(model), {"format": "pt"}, overwrite, sources
    )


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(read_json(index)["weight_map"].values()))
        return {k: v for f in files for k, v in read_safetensors(path / f).items()}
    return read_safetensors(path / "model.safetensors")


def import_hf(path: str | Path, lrm: LRMConfig | None = None) -> FalconH1LM:
    """Build our model from a Hugging Face Falcon-H1 folder, with any LRM placement, computing the same logits."""
    path = Path(path)
    cfg = config_from_hf(read_json(path / "config.json"), path / "config.json")
    model = FalconH1LM(cfg, lrm)
    hf = {k.removeprefix("model."): v.float() for k, v in _read_hf_weights(path).items()}
    sections = list(model.layers[0].mamba.section_sizes) if cfg.num_hidden_layers else []
    for i in range(cfg.num_hidden_layers):
        key = f"layers.{i}.mamba.in_proj.weight"
        if key not in hf:
            raise ValueError(f"{path}: tensor 'model.{key}' is missing")
        if hf[key].shape[0] != sum(sections):
            raise ValueError(f"{path}: tensor 'model.{key}' has {hf[key].shape[0]} rows, expected {sum(sections)}")
        for section, weight in zip(_SECTIONS, hf.pop(key).split(sections)):
            hf[f"layers.{i}.mamba.in_proj.{section}.weight"] = weight
    # The learnable multipliers are not in the file: they keep the values they were initialized with.
    for name, tensor in model.state_dict().items():
        if name.rsplit(".", 1)[-1] in MULTIPLIER_NAMES:
            hf[name] = tensor
    load_state_strict(model, hf, path)
    return model
