"""Checkpoints: a plain dict of every component's state, written atomically and verified on load.

A checkpoint is a folder ``{run_dir}/checkpoints/step_{step:08d}``:
- ``model.safetensors``: the model's state dict;
- ``tensors.safetensors``: every other tensor (optimizer moments, RNG states, ...);
- ``state.pt``: everything else as plain data (numbers, strings, lists, dicts), tensors replaced by references into
  ``tensors.safetensors``; read back with ``torch.load(weights_only=True)``, so a checkpoint can never run code;
- ``checkpoint.json``: the step and a sha256 per file, written last. A folder without it is not a checkpoint.
The folder is written under a temporary name and renamed when complete, so ``resume=auto`` never sees a partial one.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lrm_train.models import FalconH1Config, FalconH1LM
from lrm_train.nn import LRMConfig
from lrm_train.utils import atomic_directory, sha256_file

MANIFEST = "checkpoint.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_TENSOR_REF = "__tensor__"


def split_tensors(obj, tensors: dict[str, torch.Tensor], path: str = "t"):
    """``obj`` with every tensor moved into ``tensors`` and replaced by a reference to its key."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {_TENSOR_REF: path}
    if isinstance(obj, dict):
        return {k: split_tensors(v, tensors, f"{path}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(split_tensors(v, tensors, f"{path}.{i}") for i, v in enumerate(obj))
    return obj


def join_tensors(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR_REF}:
            return tensors[obj[_TENSOR_REF]]
        return {k: join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(join_tensors(v, tensors) for v in obj)
    return obj


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(path: Path, model_state: dict, state: dict) -> Path:
    tensors: dict[str, torch.Tensor] = {}
    plain = split_tensors(state, tensors)
    with atomic_directory(path, overwrite=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, tmp / "model.safetensors")
        save_file(tensors, tmp / "tensors.safetensors")
        torch.save(plain, tmp / "state.pt")
        files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps({"step": state["step"], "files": files}, indent=2))
    return path


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete regular checkpoints of a run, oldest first (partial and emergency ones are not listed)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: p.name)


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    for old in complete_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old)


def load_checkpoint(path: str | Path) -> tuple[dict, dict]:
    """(model state, everything else), after checking every file against the manifest."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"checkpoint {path}: no {MANIFEST}, so it is not a complete checkpoint")
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint {path}: {MANIFEST} is unreadable ({e})") from None
    for name, digest in files.items():
        if not (path / name).is_file():
            raise ValueError(f"checkpoint {path}: {name} is missing")
        if sha256_file(path / name) != digest:
            raise ValueError(f"checkpoint {path}: {name} does not match its checksum (corrupt or tampered with)")
    try:
        model_state = load_file(path / "model.safetensors")
        tensors = load_file(path / "tensors.safetensors")
        plain = torch.load(path / "state.pt", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, OSError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"checkpoint {path}: refusing to load it ({first_line})") from None
    return model_state, join_tensors(plain, tensors)


def model_from_checkpoint(path: str | Path) -> FalconH1LM:
    """The model of a training checkpoint (its config and LRM placement are stored in it)."""
    model_state, state = load_checkpoint(path)
    model = FalconH1LM(FalconH1Config(**state["model_config"]), LRMConfig(**state["lrm"]))
    model.load_state_dict(model_state)
    return model
