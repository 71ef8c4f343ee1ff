"""Model folders: lrm_train's own (``config.json`` with the model shape and LRM placement, ``model.safetensors``), and
the checked reading and safe writing of such folders that ``lrm_train.hf`` shares."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lrm_train.models.config import RUNTIME_FIELDS, FalconH1Config
from lrm_train.models.falcon_h1 import FalconH1LM
from lrm_train.nn import LRMConfig
from lrm_train.utils import atomic_directory, check_replaceable

FORMAT = "lrm_train.falcon_h1"
# Every folder lrm_train writes here (a model folder or a Hugging Face export, with its run's tokenizer) holds only
# these files, and its safetensors metadata says who wrote it: that is how --overwrite tells our output from a user's
# folder.
FOLDER_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
WRITTEN_BY = "lrm_train"


def _foreign_content(folder: Path) -> str | None:
    """What in ``folder`` shows that lrm_train did not write it; None when all of it is ours."""
    for entry in sorted(folder.iterdir()):
        if entry.name not in FOLDER_FILES or entry.is_symlink() or not entry.is_file():
            return f"it holds {entry.name}"
    try:
        with safe_open(folder / "model.safetensors", "pt") as weights:
            written_by = (weights.metadata() or {}).get("written_by")
    except (SafetensorError, OSError):
        written_by = None
    return None if written_by == WRITTEN_BY else "its model.safetensors is not one lrm_train wrote"


def check_output_folder(out_dir: str | Path, overwrite: bool = False, sources: Iterable[str | Path] = ()) -> None:
    """Refuse (one FileExistsError line) an output folder whose writing would delete what a user owns."""
    check_replaceable(out_dir, overwrite, _foreign_content, sources)


def write_weights_folder(
    out_dir: str | Path,
    config: dict,
    state: dict[str, torch.Tensor],
    metadata: dict[str, str],
    overwrite: bool = False,
    sources: Iterable[str | Path] = (),
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write ``config.json``, ``model.safetensors`` and ``extra_files`` (name -> text) as one folder, atomically (see
    ``check_output_folder``)."""
    check_output_folder(out_dir, overwrite, sources)
    with atomic_directory(out_dir, overwrite=True) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        save_file(state, tmp / "model.safetensors", metadata={**metadata, "written_by": WRITTEN_BY})
    return Path(out_dir)


def save_model(
    model: FalconH1LM, out_dir: str | Path, overwrite: bool = False, sources: Iterable[str | Path] = ()
) -> Path:
    """Write ``model`` as an lrm_train model folder. ``sources``: folders it was read from, never replaced."""
    shape = {k: v for k, v in dataclasses.asdict(model.cfg).items() if k not in RUNTIME_FIELDS}
    config = {"format": FORMAT, "model": shape, "lrm": dataclasses.asdict(model.lrm)}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return write_weights_folder(out_dir, config, state, {"format": FORMAT}, overwrite, sources)


def read_json(path: Path) -> dict:
    """A JSON object from a file; one ValueError line naming the file when it is missing or is not one."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if isinstance(value, dict):
        return value
    raise ValueError(f"{path}: not a JSON object")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def check_tensors(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: Path) -> None:
    """One ValueError naming ``source`` and the first missing, mis-shaped or unexpected tensor of ``found``."""
    for key, tensor in expected.items():
        if key not in found:
            raise ValueError(f"{source}: tensor {key!r} is missing")
        if found[key].shape != tensor.shape:
            raise ValueError(
                f"{source}: tensor {key!r} has shape {tuple(found[key].shape)}, expected {tuple(tensor.shape)}"
            )
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise ValueError(f"{source}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)")


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load ``state`` into ``model``, naming the first missing, unexpected or mis-shaped tensor."""
    expected = model.state_dict()
    check_tensors(state, expected, source)
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


def load_model(model_dir: str | Path) -> FalconH1LM:
    model_dir = Path(model_dir)
    config = read_json(model_dir / "config.json")
    if config.get("format") != FORMAT:
        raise ValueError(
            f"{model_dir / 'config.json'}: not an lrm_train model folder (format={config.get('format')!r})"
        )
    try:
        model = FalconH1LM(FalconH1Config(**config["model"]), LRMConfig.from_record(config["lrm"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{model_dir / 'config.json'}: not a model this version builds ({e})") from None
    load_state_strict(model, read_safetensors(model_dir / "model.safetensors"), model_dir / "model.safetensors")
    return model
