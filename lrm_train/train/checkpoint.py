"""Checkpoints: a plain dict of every component's state, written atomically and verified on load.

The state is the union of the components' ``state_dict()``s under stable keys (see ``Trainer.state_dict``) with a
``format`` version: a checkpoint of another format gets one clear error, not a KeyError deep in a component.

A checkpoint is a folder ``{run_dir}/checkpoints/step_{step:08d}``:
- ``model.safetensors``: the model's state dict;
- ``tensors.safetensors``: every other tensor (optimizer moments, RNG states, ...);
- ``state.pt``: everything else as plain data (numbers, strings, lists, dicts), tensors replaced by references into
  ``tensors.safetensors``; read back with ``torch.load(weights_only=True)``, so a checkpoint can never run code;
- ``tokenizer.json``: the run's tokenizer, so evaluation and export never look for it elsewhere (the ``run`` section
  also names the prepared data folder and the tokenizer's sha256);
- ``checkpoint.json``: the step and a sha256 per file, written last. A folder without it is not a checkpoint.
The folder is written under a temporary name and renamed when complete, so ``resume=auto`` never sees a partial one,
and ``resume=auto`` skips a newest checkpoint that fails verification for the previous complete one (but refuses to
start over when no checkpoint of the run verifies).
"""

from __future__ import annotations

import json
import logging
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
TOKENIZER = "tokenizer.json"
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


def save_checkpoint(path: Path, model_state: dict, state: dict, step: int, tokenizer: Path) -> Path:
    tensors: dict[str, torch.Tensor] = {}
    plain = split_tensors(state, tensors)
    with atomic_directory(path, overwrite=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, tmp / "model.safetensors")
        save_file(tensors, tmp / "tensors.safetensors")
        torch.save(plain, tmp / "state.pt")
        shutil.copyfile(tokenizer, tmp / TOKENIZER)
        files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=2))
    return path


def regular_checkpoint_folders(run_dir: str | Path) -> list[Path]:
    """Every ``step_*`` folder of a run, complete or not, oldest first."""
    root = checkpoint_root(run_dir)
    return sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name)) if root.is_dir() else []


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete regular checkpoints of a run, oldest first (partial and emergency ones are not listed)."""
    return [p for p in regular_checkpoint_folders(run_dir) if (p / MANIFEST).is_file()]


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
    except (SafetensorError, RuntimeError, OSError) as e:
        raise ValueError(f"checkpoint {path}: refusing to load it ({_first_line(e)})") from None
    try:
        plain = torch.load(path / "state.pt", weights_only=True)
    except Exception as e:  # noqa: BLE001 - bytes that are not a pickle fail anywhere in the unpickler (IndexError, ...)
        raise ValueError(
            f"checkpoint {path}: state.pt is not plain data ({_unpickling_reason(e)}); it is refused on purpose, "
            "since loading anything else could run code"
        ) from None
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


# What every refusal to resume says: the usual cause is a variation launched into the run directory of another run.
OTHER_RUN = (
    "; to train this config give it its own run (experiment.name=NAME or train.run_dir=PATH), "
    "or start this one over with train.resume=none (the old run is moved aside)"
)


def check_resumable(saved: dict, this: dict, path: Path) -> None:
    """Refuse to resume a checkpoint whose model, placement, optimizer or global batch differ from this run's
    (``saved`` and ``this`` are ``run_section``s), saying how to run the new config instead."""
    try:
        _check_same_run(saved, this, path)
    except ValueError as e:
        raise ValueError(f"{e}{OTHER_RUN}") from None


def _check_same_run(saved: dict, this: dict, path: Path) -> None:
    try:  # a field added since the checkpoint was written had its default then
        trained = _plain(FalconH1Config(**saved["model_config"]))
    except (TypeError, ValueError):  # not a model this version builds: compared as recorded
        trained = saved["model_config"]
    for key, value in this["model_config"].items():
        if trained.get(key) != value:
            raise ValueError(
                f"checkpoint {path}: trained with model.{key}={trained.get(key)!r}, this run has {value!r}"
            )
    if saved["lrm"] != this["lrm"]:
        raise ValueError(f"checkpoint {path}: trained with lrm={saved['lrm']}, this run has {this['lrm']}")
    if saved["optimizer"] != this["optimizer"]:
        raise ValueError(
            f"checkpoint {path}: trained with optim={saved['optimizer']}, "
            f"this run has optim={this['optimizer']} (its optimizer state would not fit)"
        )
    saved_tokenizer = (saved.get("data") or {}).get("tokenizer_sha256")
    if saved_tokenizer is not None and saved_tokenizer != this["data"]["tokenizer_sha256"]:
        raise ValueError(
            f"checkpoint {path}: trained with another tokenizer (sha256 {saved_tokenizer[:12]}...) than this run's data "
            f"({this['data']['folder']}): its weights would read other tokens"
        )
    if saved["global_batch"] != this["global_batch"]:
        raise ValueError(
            f"checkpoint {path}: global batch {saved['global_batch']}, this run has {this['global_batch']} "
            "(micro_batch_size x grad_accum x world size): adjust train.grad_accum"
        )


def _plain(node) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(node), enum_to_str=True)


def run_section(cfg, global_batch: int, data_folder: Path, tokenizer: Path) -> dict:
    """The ``run`` entry: what the checkpoint was trained as (checked on resume, used to rebuild the model) and on
    what data (the prepared folder, for validation scores; the tokenizer's sha256, which an export checks).

    Plain data only (enums as their strings): ``state.pt`` is read with ``weights_only=True``.
    """

    return {
        "model_config": {k: v for k, v in _plain(cfg.model).items() if k not in RUNTIME_FIELDS},
        "lrm": _plain(cfg.lrm),
        "optimizer": _plain(cfg.optim)["name"],
        "global_batch": global_batch,
        "config": OmegaConf.to_yaml(OmegaConf.structured(cfg)),
        "data": {"folder": str(Path(data_folder).resolve()), "tokenizer_sha256": sha256_file(tokenizer)},
    }


def load_resumable(path: Path) -> tuple[dict, dict]:
    model_state, state = load_checkpoint(path)
    check_format(state, path)
    _move_multiplier_decay(state["run"])
    return model_state, state


def _move_multiplier_decay(run: dict) -> None:
    """Checkpoints written while the multipliers' weight decay was ``lrm.weight_decay`` record it in ``run.lrm`` and
    the config; it is ``optim.multiplier_weight_decay`` now, an optimizer setting that a resume may change."""
    decay = run.get("lrm", {}).pop("weight_decay", None)
    if decay is None:
        return
    config = OmegaConf.create(run["config"])
    config.lrm.pop("weight_decay")
    config.optim.multiplier_weight_decay = decay
    run["config"] = OmegaConf.to_yaml(config)


def newest_loadable(run_dir: str | Path) -> tuple[Path, dict, dict] | None:
    """The newest checkpoint of a run that verifies, skipping (with a warning) newer ones that do not; None when the run
    has no ``step_*`` folder at all.

    When such folders exist and none verifies, one line names each folder and what is wrong with it.
    """
    folders = regular_checkpoint_folders(run_dir)
    problems = []
    for path in reversed(folders):
        try:
            return (path, *load_resumable(path))
        except ValueError as e:
            log.warning("skipping %s", e)
            problems.append(str(e).removeprefix(f"checkpoint {path}: "))
    if not folders:
        return None
    found = "; ".join(f"{p.name}: {why}" for p, why in zip(reversed(folders), problems))
    raise ValueError(f"no checkpoint of {checkpoint_root(run_dir)} loads ({found})")


def model_from_checkpoint(path: str | Path) -> FalconH1LM:
    """The model of a training checkpoint (its config and LRM placement are stored in it)."""
    model_state, state = load_resumable(Path(path))
    return model_from_state(model_state, state["run"], Path(path))


def model_from_state(model_state: dict, run: dict, path: Path) -> FalconH1LM:
    """The model of a checkpoint already loaded (``load_resumable``): its ``run`` section's config and placement."""
    model = FalconH1LM(FalconH1Config(**run["model_config"]), LRMConfig(**run["lrm"]))
    load_weights(model.load_state_dict, model_state, path)
    return model


def load_weights(load_state_dict, model_state: dict, path: Path) -> None:
    """``load_state_dict(model_state)`` (a model's or an engine's), with one line naming the checkpoint on a misfit."""
    try:
        load_state_dict(model_state)
    except RuntimeError as e:
        raise ValueError(
            f"checkpoint {path}: its weights were made for another model than the config it records "
            f"({_describe_misfit(str(e))})"
        ) from None


def _describe_misfit(message: str) -> str:
    """torch's ``load_state_dict`` error (every key, kilobytes long) as counts and a first example of each kind."""
    parts = []
    for kind, what in (("Missing", "missing"), ("Unexpected", "not in this model")):
        found = re.search(rf"{kind} key\(s\) in state_dict: (.*)", message)
        if found:
            names = re.findall(r'"([^"]+)"', found.group(1))
            parts.append(f"{len(names)} tensors {what}, e.g. {names[0]}")
    shapes = re.findall(
        r"size mismatch for ([^:]+): copying a param with shape torch.Size\((\[.*?\])\) from "
        r"checkpoint, the shape in current model is torch.Size\((\[.*?\])\)",
        message,
    )
    if shapes:
        name, saved, wanted = shapes[0]
        parts.append(f"{len(shapes)} tensors of another shape, e.g. {name}: {saved} saved, {wanted} here")
    return "; ".join(parts) or _first_line(RuntimeError(message))


def _unpickling_reason(error: BaseException) -> str:
    """What torch found in a refused ``state.pt``, without its advice to load it unsafely."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation", "WeightsUnpickler")
    reasons = [line for line in lines if not line.startswith(boilerplate)]
    return reasons[0] if reasons else type(error).__name__


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else type(error).__name__
