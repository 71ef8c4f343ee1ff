"""lrm_train's own model folder: ``config.json`` (model shape + LRM placement) and ``model.safetensors``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lrm_train.models.config import FalconH1Config
from lrm_train.models.falcon_h1 import FalconH1LM
from lrm_train.nn import LRMConfig
from lrm_train.utils import atomic_directory

FORMAT = "lrm_train.falcon_h1"


def save_model(model: FalconH1LM, out_dir: str | Path, overwrite: bool = False) -> Path:
    config = {"format": FORMAT, "model": dataclasses.asdict(model.cfg), "lrm": dataclasses.asdict(model.lrm)}
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, tmp / "model.safetensors", metadata={"format": FORMAT})
    return Path(out_dir)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_safetensors(path: Path) -> dict:
    try:
        return load_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def load_state_strict(model: FalconH1LM, state: dict, source: Path) -> None:
    """Load ``state`` into ``model``, naming the first missing, unexpected or mis-shaped tensor."""
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise ValueError(f"{source}: tensor {key!r} is missing")
        if state[key].shape != tensor.shape:
            raise ValueError(
                f"{source}: tensor {key!r} has shape {tuple(state[key].shape)}, expected {tuple(tensor.shape)}"
            )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(f"{source}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


def load_model(model_dir: str | Path) -> FalconH1LM:
    model_dir = Path(model_dir)
    config = read_json(model_dir / "config.json")
    if config.get("format") != FORMAT:
        raise ValueError(
            f"{model_dir / 'config.json'}: not an lrm_train model folder (format={config.get('format')!r})"
        )
    model = FalconH1LM(FalconH1Config(**config["model"]), LRMConfig(**config["lrm"]))
    load_state_strict(model, read_safetensors(model_dir / "model.safetensors"), model_dir / "model.safetensors")
    return model
