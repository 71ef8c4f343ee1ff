"""Checkpoints: a plain dict of every component's state, written atomically and verified on load.

The state is the union of the components' ``state_dict()``s under stable keys (see ``Trainer.state_dict``) with a
``format`` version: a checkpoint of another format gets one clear error, not a KeyError deep in a component.

A checkpoint is a folder ``{run_dir}/checkpoints/step_{step:08d}``:
- ``model.safetensors``: the model's state dict;
- ``tensors.safetensors``: every other tensor (optimizer moments, RNG states, ...);
- ``state.pt``: everything else as plain data (numbers, strings, lists, dicts), tensors replaced by references into
  ``tensors.safetensors``; read back with ``torch.load(weights_only=True)``, so a checkpoint can never run code;
- ``checkpoint.json``: the step and a sha256 per file, written last. A folder without it is not a checkpoint.
The folder is written under a temporary name and renamed when complete, so ``resume=auto`` never sees a partial one,
and ``resume=auto`` skips a newest checkpoint that fails verification for the previous complete one.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lrm_train.models import FalconH1Config, FalconH1LM
from lrm_train.models.config import RUNTIME_FIELDS
from lrm_train.nn import LRMConfig
from lrm_train.utils import atomic_directory, sha256_file

log = logging.getLogger("lrm_train")

MANIFEST = "checkpoint.json"
FORMAT = "lrm_train.checkpoint/2"
# Every checkpoint of FORMAT has these top-level entries (the components' states).
_SECTIONS = ("format", "run", "trainer", "optimizer", "loader", "rng", "callbacks")
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


def save_checkpoint(path: Path, model_state: dict, state: dict, step: int) -> Path:
    tensors: dict[str, torch.Tensor] = {}
    plain = split_tensors(state, tensors)
    with atomic_directory(path, overwrite=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, tmp / "model.safetensors")
        save_file(tensors, tmp / "tensors.safetensors")
        torch.save(plain, tmp / "state.pt")
        files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=2))
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
        raise ValueError(f"checkpoint {path}: refusing to load it ({_first_line(e)})") from None
    return model_state, join_tensors(plain, tensors)


def check_format(state, path: Path) -> None:
    """One line for a checkpoint this version cannot read (older format, or a state.pt of another structure)."""
    found = state.get("format") if isinstance(state, dict) else None
    if found != FORMAT:
        written = f"format {found!r}" if found else "no format version (written by an older lrm_train)"
        raise ValueError(f"checkpoint {path}: {written}; this lrm_train reads {FORMAT!r} only")
    missing = [key for key in _SECTIONS if key not in state]
    if missing or not isinstance(state["run"], dict) or not isinstance(state["trainer"], dict):
        raise ValueError(f"checkpoint {path}: state.pt lacks {', '.join(missing) or 'a valid run/trainer entry'}")


def check_resumable(saved: dict, this: dict, path: Path) -> None:
    """Refuse to resume a checkpoint whose model, placement, optimizer or global batch differ from this run's
    (``saved`` and ``this`` are ``run_section``s)."""
    for key, value in this["model_config"].items():
        if saved["model_config"].get(key) != value:
            raise ValueError(
                f"checkpoint {path}: trained with model.{key}={saved['model_config'].get(key)!r}, this run has {value!r}"
            )
    if saved["lrm"] != this["lrm"]:
        raise ValueError(f"checkpoint {path}: trained with lrm={saved['lrm']}, this run has {this['lrm']}")
    if saved["optimizer"] != this["optimizer"]:
        raise ValueError(
            f"checkpoint {path}: trained with optim={saved['optimizer']}, "
            f"this run has optim={this['optimizer']} (its optimizer state would not fit)"
        )
    if saved["global_batch"] != this["global_batch"]:
        raise ValueError(
            f"checkpoint {path}: global batch {saved['global_batch']}, this run has {this['global_batch']} "
            "(micro_batch_size x grad_accum x world size): adjust train.grad_accum"
        )


def run_section(cfg, global_batch: int) -> dict:
    """The ``run`` entry: what the checkpoint was trained as (checked on resume, used to rebuild the model).

    Plain data only (enums as their strings): ``state.pt`` is read with ``weights_only=True``.
    """

    def plain(node) -> dict:
        return OmegaConf.to_container(OmegaConf.structured(node), enum_to_str=True)

    return {
        "model_config": {k: v for k, v in plain(cfg.model).items() if k not in RUNTIME_FIELDS},
        "lrm": plain(cfg.lrm),
        "optimizer": plain(cfg.optim)["name"],
        "global_batch": global_batch,
        "config": OmegaConf.to_yaml(OmegaConf.structured(cfg)),
    }


def load_resumable(path: Path) -> tuple[dict, dict]:
    model_state, state = load_checkpoint(path)
    check_format(state, path)
    return model_state, state


def newest_loadable(run_dir: str | Path) -> tuple[Path, dict, dict] | None:
    """The newest complete checkpoint of a run that verifies, skipping (with a warning) newer ones that do not."""
    for path in reversed(complete_checkpoints(run_dir)):
        try:
            return (path, *load_resumable(path))
        except ValueError as e:
            log.warning("skipping %s: %s", path, e)
    return None


def model_from_checkpoint(path: str | Path) -> FalconH1LM:
    """The model of a training checkpoint (its config and LRM placement are stored in it)."""
    path = Path(path)
    model_state, state = load_resumable(path)
    run = state["run"]
    model = FalconH1LM(FalconH1Config(**run["model_config"]), LRMConfig(**run["lrm"]))
    load_weights(model.load_state_dict, model_state, path)
    return model


def load_weights(load_state_dict, model_state: dict, path: Path) -> None:
    """``load_state_dict(model_state)`` (a model's or an engine's), with one line naming the checkpoint on a misfit."""
    try:
        load_state_dict(model_state)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path}: its weights do not fit this model ({_first_line(e)})") from None


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else type(error).__name__
