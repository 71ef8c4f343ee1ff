"""Checkpoints: every component's state, written by every rank in shards, atomically, and verified on load.

The state is the union of the components' ``state_dict()``s under stable keys (see ``Trainer.state_dict``) with a
``format`` version: a checkpoint of another format gets one clear error, not a KeyError deep in a component.

A checkpoint is a folder ``{run_dir}/checkpoints/step_{step:08d}`` (format ``lrm_train.checkpoint/3``, sharded):
- ``model.safetensors`` and ``optimizer.safetensors``: rank 0's pieces of the model and optimizer states (no optimizer
  files in a run's weights-only final checkpoint, ``train.final_checkpoint=weights``, whose state says
  ``optimizer: None``: resuming it is refused unless the run is already at its end), and
  ``model.rank{r:05d}.safetensors`` / ``optimizer.rank{r:05d}.safetensors`` those of rank ``r`` (only ranks that hold
  any). A piece that is a whole tensor is stored under its name, with its shape, so a one-process or DDP checkpoint's
  ``model.safetensors`` is a plain state dict; a slice is stored flat as ``{name}@{offset}`` with the full shape in the
  file's metadata. Replicated engines (single, DDP) have rank 0 write everything once; ZeRO ranks write the slices of
  their shards (``Engine.model_shards``/``optimizer_shards``). A load puts the full tensors back together, checking
  that the pieces cover each one exactly, and the engine cuts them into its own shards: a checkpoint resumes on any
  world size and engine;
- ``tensors.safetensors``: every other tensor (RNG states of every rank, ...);
- ``state.pt``: everything else as plain data (numbers, strings, lists, dicts), tensors replaced by references into
  ``tensors.safetensors``; read back with ``torch.load(weights_only=True)``, so a checkpoint can never run code;
- ``tokenizer.json``: the run's tokenizer, so evaluation and export never look for it elsewhere (the ``run`` section
  also names the prepared data folder and the tokenizer's sha256);
- ``checkpoint.json``: the format, step, world size and a sha256 per file of every rank, written last. A folder
  without it is not a checkpoint.
The folder is written under a temporary name that rank 0 creates and every rank writes into; each rank flushes its
own files to disk and reports their checksums (a collective), and only then does rank 0 write the manifest and rename
the folder. So ``resume=auto`` never sees a partial one, and it skips a newest checkpoint that fails verification for
the previous complete one (but refuses to start over when no checkpoint of the run verifies).

Why our own files and not ``torch.distributed.checkpoint`` (DCP): DCP's metadata file is a pickle (loading one can
run code, which ``state.pt`` is read to rule out), its save plans with collectives on the default group (which must
not run from a background writer thread while the training step uses that group), and ZeRO's shards are ragged flat
slices of parameters, not the DTensors DCP describes. The pieces here carry what DCP records (name, full shape,
offset) in safetensors files that any tool reads.

The full-state format ``lrm_train.checkpoint/2`` (one ``model.safetensors``, the optimizer in ``tensors.safetensors``)
still loads; ``python -m lrm_train.train.consolidate`` writes it from a sharded checkpoint.

Saves may be asynchronous (``ShardedSave``): the pieces are copied to host memory at the step boundary and a
background thread writes them; the manifest and the rename come later, on the training thread, after every rank's
thread has finished, so the thread never runs a collective.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lrm_train.distributed.engine import Engine, TensorPiece
from lrm_train.models import FalconH1Config, FalconH1LM
from lrm_train.models.config import RUNTIME_FIELDS
from lrm_train.nn import LRMConfig
from lrm_train.utils import (
    AtomicDirectory,
    atomic_directory,
    first_line,
    fsync_file,
    naming_the_destination,
    sha256_file,
)

log = logging.getLogger("lrm_train")

MANIFEST = "checkpoint.json"
TOKENIZER = "tokenizer.json"
FORMAT = "lrm_train.checkpoint/3"
FULL_FORMAT = "lrm_train.checkpoint/2"  # the whole state in one set of files: still read, written by consolidate
# Every checkpoint has these top-level entries (the components' states; a sharded one's optimizer from its shards).
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
    """Write a full-state checkpoint (``FULL_FORMAT``: ``state`` holds the whole optimizer state) from one process."""
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


def shard_file(kind: str, rank: int) -> str:
    """The file of rank ``rank``'s pieces of ``kind`` (model, optimizer); rank 0's keeps the full format's name."""
    return f"{kind}.safetensors" if rank == 0 else f"{kind}.rank{rank:05d}.safetensors"


@dataclass
class RankSnapshot:
    """What one rank writes into a checkpoint, in host memory of its own, so training may change the originals."""

    rank: int
    model: list[TensorPiece]
    optimizer: list[TensorPiece] | None  # None: not saved (a weights-only final checkpoint)
    state: dict | None  # rank 0: the plain state (state.pt), tensors split off into ``tensors``
    tensors: dict[str, torch.Tensor]
    tokenizer: Path | None  # rank 0


def snapshot(
    rank: int, model: list[TensorPiece], optimizer: list[TensorPiece] | None, state: dict | None, tokenizer
) -> RankSnapshot:
    """Copies of the pieces on the host (on GPU, this device-to-host copy is what an asynchronous save stalls on)."""

    def host(pieces):
        return [TensorPiece(p.name, p.shape, p.offset, p.values.detach().to("cpu", copy=True)) for p in pieces]

    tensors: dict[str, torch.Tensor] = {}
    plain = split_tensors(state, tensors) if state is not None else None
    return RankSnapshot(
        rank,
        host(model),
        None if optimizer is None else host(optimizer),
        plain,
        {k: v.clone() for k, v in tensors.items()},
        tokenizer,
    )


def _save_pieces(path: Path, pieces: list[TensorPiece]) -> None:
    tensors, shapes = {}, {}
    for piece in pieces:
        if piece.whole:
            tensors[piece.name] = piece.values.reshape(piece.shape)
        else:
            tensors[f"{piece.name}@{piece.offset}"] = piece.values.reshape(-1)
            shapes[piece.name] = list(piece.shape)
    save_file(tensors, path, metadata={"format": FORMAT, "shapes": json.dumps(shapes)})


def write_rank_files(folder: Path, snap: RankSnapshot) -> dict[str, str]:
    """Write one rank's files into ``folder``, flush them to disk, and return their sha256 by name."""
    names = []
    for kind, pieces in (("model", snap.model), ("optimizer", snap.optimizer)):
        if pieces or (snap.rank == 0 and pieces is not None):
            names.append(shard_file(kind, snap.rank))
            _save_pieces(folder / names[-1], pieces)
    if snap.state is not None:
        save_file(snap.tensors, folder / "tensors.safetensors")
        torch.save(snap.state, folder / "state.pt")
        shutil.copyfile(snap.tokenizer, folder / TOKENIZER)
        names += ["tensors.safetensors", "state.pt", TOKENIZER]
    for name in names:
        fsync_file(folder / name)
    return {name: sha256_file(folder / name) for name in names}


class ShardedSave:
    """One checkpoint written by every rank: started together, finished together (both collective).

    ``__init__``: rank 0 creates the temporary folder and every rank learns its name; then each rank writes its files
    (``write_rank_files``), in a background thread when ``background``. ``finish``: each rank waits for its own
    write; the ranks exchange their checksums or errors; rank 0 writes the manifest and renames the folder only if
    every rank's files are on disk, else removes it. A crash before that leaves a ``.tmp-*`` folder, never a
    ``step_*`` one, so the previous checkpoint stays the newest valid one.
    """

    def __init__(self, engine: Engine, path: Path, snap: RankSnapshot, step: int, background: bool) -> None:
        self.engine, self.path, self.snap, self.step = engine, path, snap, step
        self.folder: AtomicDirectory | None = None
        error = ""
        if engine.is_main:
            try:
                self.folder = AtomicDirectory(path, overwrite=True)
            except OSError as e:
                error = str(e)
        tmp, error = engine.all_gather_object((self.folder.tmp if self.folder else None, error))[0]
        if error:
            raise OSError(error)
        self.tmp = Path(tmp)
        self.error, self.files = "", {}
        self.thread = threading.Thread(target=self._write, name=f"checkpoint {path.name}", daemon=True)
        if background:
            self.thread.start()
        else:
            self._write()

    def _write(self) -> None:
        try:
            with naming_the_destination(self.path):
                self.files = write_rank_files(self.tmp, self.snap)
        except Exception as e:  # noqa: BLE001 - reported to every rank by ``finish``, which raises it there
            self.error = f"{type(e).__name__}: {first_line(e)}" if not isinstance(e, OSError) else str(e)
        self.snap = None  # the host copies are no longer needed

    def written(self) -> bool:
        """Whether this rank's write is over (no wait)."""
        return not self.thread.is_alive()

    def finish(self) -> Path:
        if self.thread.ident is not None:
            self.thread.join()
        reports = self.engine.all_gather_object((self.error, self.files))
        error = next((e for e, _ in reports if e), "")
        if self.engine.is_main:
            if error:
                self.folder.discard()
            else:
                try:
                    files = {name: digest for _, named in reports for name, digest in named.items()}
                    manifest = {"format": FORMAT, "step": self.step, "world_size": len(reports), "files": files}
                    (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
                    self.folder.commit()
                except OSError as e:
                    error = str(e)
        error = self.engine.all_gather_object(error)[0]
        if error:
            raise OSError(error)
        return self.path

    def abandon(self) -> None:
        """After a failure of this rank alone (no collective is safe): wait for its write and drop the folder."""
        if self.thread.ident is not None:
            self.thread.join()
        if self.folder is not None:
            self.folder.discard()


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
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint {path}: {MANIFEST} is unreadable ({e})") from None
    for name, digest in files.items():
        if not (path / name).is_file():
            raise ValueError(f"checkpoint {path}: {name} is missing")
        if sha256_file(path / name) != digest:
            raise ValueError(f"checkpoint {path}: {name} does not match its checksum (corrupt or tampered with)")
    sharded = manifest.get("format") == FORMAT
    try:
        if sharded:
            model_state = _assembled(path, [name for name in files if _SHARD_FILE["model"].match(name)])
            optimizer = _assembled(path, [name for name in files if _SHARD_FILE["optimizer"].match(name)])
        else:
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
    state = join_tensors(plain, tensors)
    # A weights-only checkpoint's state says so with ``optimizer: None``.
    if sharded and isinstance(state, dict) and state.get("format") == FORMAT and state.get("optimizer", {}) is not None:
        state["optimizer"] = {}
        for name, tensor in optimizer.items():
            param, key = name.rsplit("/", 1)
            state["optimizer"].setdefault(param, {})[key] = tensor
    return model_state, state


_SHARD_FILE = {kind: re.compile(rf"^{kind}(\.rank\d{{5}})?\.safetensors$") for kind in ("model", "optimizer")}


def _assembled(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The full tensors from the pieces in the files ``names`` of a sharded checkpoint, each covered exactly once."""
    whole: dict[str, torch.Tensor] = {}
    slices: dict[str, list[tuple[int, torch.Tensor]]] = {}
    shapes: dict[str, list[int]] = {}
    for name in names:
        with safe_open(path / name, "pt") as f:
            shapes.update(json.loads((f.metadata() or {}).get("shapes", "{}")))
            for key in f.keys():  # noqa: SIM118 - a safetensors file is not iterable
                tensor_name, at, offset = key.rpartition("@")
                if at:
                    slices.setdefault(tensor_name, []).append((int(offset), f.get_tensor(key)))
                elif key in whole:
                    raise ValueError(f"checkpoint {path}: {key} is stored twice")
                else:
                    whole[key] = f.get_tensor(key)
    for name, pieces in slices.items():
        if name in whole or name not in shapes:
            raise ValueError(f"checkpoint {path}: the pieces of {name} do not fit together")
        numel = math.prod(shapes[name])
        full = torch.empty(numel, dtype=pieces[0][1].dtype)
        covered = 0
        for offset, values in sorted(pieces, key=lambda piece: piece[0]):
            if offset != covered or offset + values.numel() > numel:
                raise ValueError(f"checkpoint {path}: the pieces of {name} overlap or leave a gap at element {covered}")
            full[offset : offset + values.numel()] = values
            covered += values.numel()
        if covered != numel:
            raise ValueError(f"checkpoint {path}: the pieces of {name} cover {covered} of its {numel} elements")
        whole[name] = full.view(shapes[name])
    return whole


def check_format(state, path: Path) -> None:
    """One line for a checkpoint this version cannot read (older format, or a state.pt of another structure)."""
    found = state.get("format") if isinstance(state, dict) else None
    if found not in (FORMAT, FULL_FORMAT):
        written = f"format {found!r}" if found else "no format version (written by an older lrm_train)"
        raise ValueError(f"checkpoint {path}: {written}; this lrm_train reads {FORMAT!r} and {FULL_FORMAT!r} only")
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
