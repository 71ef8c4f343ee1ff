"""From a run config to the parts a run is made of: data, model, parameter classes, optimizer (inside its engine),
loader. One function, so the trainer, the benchmarks and the experiments assemble a run the same way."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import shlex
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lrm_train.data import BatchLoader, TokenData, TokenSplit
from lrm_train.data.config import MANIFEST, DataConfig
from lrm_train.data.loader import validation_windows
from lrm_train.data.mixture import MixtureLoader, check_same_tokenizer
from lrm_train.data.prepare import OUTPUT_FIELDS, prepare, prepared_folder
from lrm_train.data.sources import source_bytes
from lrm_train.data.verify import check_folder
from lrm_train.distributed import Engine
from lrm_train.models import FalconH1LM
from lrm_train.models.hf_folder import transfer_function
from lrm_train.optim import ParamClass, build_optimizer, classify_parameters
from lrm_train.train.artifact import open_artifact
from lrm_train.train.config import RunConfig
from lrm_train.utils import sha256_file

log = logging.getLogger(__name__)


@dataclass
class Components:
    data: TokenData
    model: nn.Module  # the unwrapped model (the engine's wrapper is ``engine.model``)
    classes: dict[str, ParamClass]
    optimizer: object  # whose ``param_groups`` the schedule drives
    loader: BatchLoader
    global_batch: int
    num_params: int  # counted before the engine shards anything (ZeRO-3 frees the full tensors)
    flops_per_token: float
    # Metric -> (validation split, its weight in val_loss): {val_loss: (val, 1)} for data.source; for data.mixture,
    # val_loss/<name> per source, val_loss their mean weighted as the mixture (the loss on the training distribution).
    validation: dict[str, tuple[TokenSplit, float]]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# The largest source a distributed run prepares itself (rank 0, the other ranks waiting): a few minutes of one node's
# cores at most. A larger one is prepared beforehand (python -m lrm_train.data.prepare, in parts on a cluster):
# inside the job its prepare would hold every GPU of the job idle.
IN_JOB_PREPARE_BYTES = 64 << 20
# While rank 0 prepares, the others wait in one short collective per beat, never in one as long as the whole prepare
# (which dist.timeout_minutes would cut however well it progresses).
HEARTBEAT_SECONDS = 30.0


def prepare_command(data: DataConfig) -> str:
    """The prepare command line that makes ``data``'s folder: every setting that differs from the defaults."""
    defaults = DataConfig()
    keys = ("name", "out_root", *OUTPUT_FIELDS)
    overrides = [f"data.{key}={getattr(data, key)}" for key in keys if getattr(data, key) != getattr(defaults, key)]
    return shlex.join(["python", "-m", "lrm_train.data.prepare", *overrides])


def _prepare_or_find(data: DataConfig, world_size: int) -> Path:
    if data.part is not None:
        raise ValueError(f"data.part={data.part} is for python -m lrm_train.data.prepare only: leave it out of a run")
    if world_size > 1:
        folder = prepared_folder(data)
        if folder is not None and (folder / MANIFEST).is_file():
            return folder
        size = source_bytes(data)
        if size is None or size > IN_JOB_PREPARE_BYTES:
            what = "a hub dataset" if size is None else f"{size / 2**20:,.0f} MiB"
            raise ValueError(
                f"data.source={data.source} ({what}) is not prepared yet, and a distributed run prepares only sources "
                f"up to {IN_JOB_PREPARE_BYTES >> 20} MiB; prepare it first: {prepare_command(data)}"
            )
    return prepare(data)


@contextlib.contextmanager
def _heartbeat(engine: Engine) -> Iterator[None]:
    """Rank 0's side of the wait: a beat every ``HEARTBEAT_SECONDS`` from a thread, then a last one saying done."""
    if engine.world_size == 1:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            engine.max_over_ranks([1])  # host-side (gloo): no CUDA device needed in this thread

    thread = threading.Thread(target=beat, name="prepare-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        engine.max_over_ranks([0])


def _wait_for_main(engine: Engine) -> None:
    while engine.max_over_ranks([0])[0]:  # each call returns at rank 0's next beat
        pass


def prepare_data(cfg: RunConfig, engine: Engine) -> TokenData:
    """``data.source``'s folder, prepared (or found) by rank 0 and opened by every rank (``_open_checked``). Under
    torchrun a source larger than ``IN_JOB_PREPARE_BYTES`` must be prepared already (one line gives the command)."""
    data = _open_checked(engine, lambda: _prepare_or_find(cfg.data, engine.world_size), cfg.data.verify_checksums)
    _check_vocab(data, cfg)
    # Both splits must hold a window of seq_len + 1 tokens: found here, not at the first evaluation.
    validation_windows(data.splits["val"], cfg.data.seq_len, cfg.data.val_windows)
    return data


def _open_checked(engine: Engine, find: Callable[[], str | Path], verify_checksums: bool) -> TokenData:
    """Rank 0 finds the folder (``find``: prepares it, or names one prepared ahead) and checks its shards
    (``verify.check_folder``: by size and stamp, a shard hashed only when its stamp changed), the other ranks waiting
    on its heartbeat; then every rank opens the folder, or raises rank 0's error."""
    outcome: tuple[str, str] = ("ok", "")
    if engine.is_main:
        with _heartbeat(engine):
            try:
                folder = find()
                check_folder(folder, verify_checksums)
                outcome = ("ok", str(folder))
            except (ValueError, OSError) as e:
                outcome = ("error", str(e))
    elif engine.world_size > 1:
        _wait_for_main(engine)
    status, value = engine.all_gather_object(outcome)[0]
    if status == "error":
        raise ValueError(value)
    return TokenData(value)  # checked once above; each rank checks the shards it reads by size


def _check_vocab(data: TokenData, cfg: RunConfig) -> None:
    if data.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {data.vocab_size} tokens "
            f"({data.tokenizer_path})"
        )


def mixture_data(cfg: RunConfig, engine: Engine) -> dict[str, TokenData]:
    """``data.mixture``'s folders by source name: a ``path`` opened as it is, a ``source`` prepared like ``data.source``
    with the mixture's one tokenizer (``data.tokenizer``, else the first source's), each checked like ``prepare_data``'s.
    """
    sources, tokenizer = {}, cfg.data.tokenizer
    for entry in cfg.data.mixture:
        if entry.path is not None:
            data = _open_checked(engine, functools.partial(str, entry.path), cfg.data.verify_checksums)
        else:
            data = prepare_data(replace(cfg, data=cfg.data.source_config(entry, tokenizer)), engine)
        tokenizer = tokenizer or str(data.tokenizer_path)
        sources[entry.name] = data
    check_same_tokenizer(sources)
    _check_vocab(next(iter(sources.values())), cfg)
    for name, data in sources.items():
        try:
            validation_windows(data.splits["val"], cfg.data.seq_len, cfg.data.val_windows)
        except ValueError as e:
            raise ValueError(f"data.mixture source {name} ({data.folder}): {e}") from None
    return sources


def start_from(model: FalconH1LM, path: str, tokenizer: Path) -> None:
    """``train.init_from``: give ``model`` (built with this run's config) the function of the model at ``path``.

    The source must compute what this run's model config defines (its shape and its multipliers at this width; how
    either was initialized may differ, and so may the LRM placement and init: this run's learnable multipliers start
    at their init values and the weights carry the rest)
    and, when it records one, this run's tokenizer: a model paired with another tokenizer reads other tokens.
    """
    with torch.random.fork_rng(devices=[]):  # building the source must not move this run's random stream
        artifact = open_artifact(path, need_tokenizer=False)
    source, this = artifact.model.cfg.function_definition(), model.cfg.function_definition()
    for key, value in this.items():
        if not _same(source.get(key), value):
            raise ValueError(
                f"train.init_from={path}: its model has model.{key}={source.get(key)!r}, this run has {value!r}"
            )
    if artifact.tokenizer is None:
        log.warning(
            "train.init_from=%s records no tokenizer: make sure data.tokenizer is the one it was trained with", path
        )
    elif sha256_file(artifact.tokenizer) != sha256_file(tokenizer):
        raise ValueError(
            f"train.init_from={path} was trained with the tokenizer {artifact.tokenizer}, this run's data uses "
            f"{tokenizer}: set data.tokenizer={artifact.tokenizer} (and a data.out_root for it)"
        )
    transfer_function(artifact.model, model, Path(path))
    log.info("started from the weights of %s (%s)", path, artifact.kind)


def _same(a, b) -> bool:
    """Equal, floats (and lists of them) up to rounding: a multiplier read back from a Hugging Face config was divided
    and multiplied on the way."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, int | float) and isinstance(b, int | float) and math.isclose(a, b, rel_tol=1e-9)
    return a == b


def wrap_layers(
    layers: nn.ModuleList, compile: bool, activation_checkpointing: bool, compile_backend: str = "inductor"
) -> None:
    """The per-layer options of ``train``, applied once to the built model (the layers' code knows nothing of them).

    ``activation_checkpointing``: a layer keeps only its input for backward and runs its forward again there
    (non-reentrant ``torch.utils.checkpoint``). ``compile``: each decoder layer's forward is compiled by
    ``torch.compile``, not the whole model: the LM head's loop over chunks and the embedding stay eager, and the Triton
    SSD scan is a custom op the graphs call as one opaque op. With both, the checkpoint wraps the compiled forward:
    compiling around the checkpoint compiles nothing (dynamo skips the module call and ``checkpoint`` disables it),
    silently. The parameters keep their names either way (checkpoints do not change).
    """
    for layer in layers:
        forward = layer.forward
        if compile:
            forward = torch.compile(forward, backend=compile_backend)
        if activation_checkpointing:
            forward = functools.partial(checkpoint, forward, use_reentrant=False)
        layer.forward = forward


def build(cfg: RunConfig, engine: Engine, fresh_start: bool = True) -> Components:
    """Seed, then data -> model -> parameter classes -> optimizer -> engine -> loader (this order fixes the RNG use).

    ``fresh_start``: the run will not resume from a checkpoint, so ``train.init_from`` (if set) gives the weights.
    """
    seed_everything(cfg.train.seed)
    sources = mixture_data(cfg, engine) if cfg.data.mixture else {None: prepare_data(cfg, engine)}
    data = next(iter(sources.values()))  # the tokenizer all sources share; the run's data folder for checkpoints
    model = FalconH1LM(cfg.model, cfg.lrm)
    if cfg.train.init_from is not None and fresh_start:
        start_from(model, cfg.train.init_from, data.tokenizer_path)
    model = model.to(engine.device)
    num_params, flops_per_token = model.num_params(), model.flops_per_token(cfg.data.seq_len)
    wrap_layers(model.layers, cfg.train.compile, cfg.train.activation_checkpointing)
    classes = classify_parameters(model)
    autocast = cfg.train.precision.autocast_dtype(cuda=engine.device.type == "cuda")
    optimizer = engine.setup(
        model, build_optimizer(model, classes, cfg.optim), classes, cfg.train.clip_multipliers, autocast
    )
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * engine.world_size
    reading = dict(
        seq_len=cfg.data.seq_len,
        global_batch=global_batch,
        rank=engine.rank,
        world_size=engine.world_size,
        seed=cfg.train.seed,
        prefetch=cfg.data.prefetch,
        pin_memory=engine.device.type == "cuda",
    )
    if cfg.data.mixture:
        splits = {name: source.splits["train"] for name, source in sources.items()}
        loader = MixtureLoader(splits, [entry.weight for entry in cfg.data.mixture], **reading)
        weights = loader.mixture()
        validation = {f"val_loss/{name}": (sources[name].splits["val"], weights[name]) for name in sources}
    else:
        loader = BatchLoader(data.splits["train"], **reading)
        validation = {"val_loss": (data.splits["val"], 1.0)}
    return Components(data, model, classes, optimizer, loader, global_batch, num_params, flops_per_token, validation)
