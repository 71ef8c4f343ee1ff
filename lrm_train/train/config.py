"""The run configuration: one dataclass per config group, registered in Hydra's ConfigStore, composed by ``compose``.

The dataclasses hold every default; the YAML files under ``configs/`` only name group options and what they change.
``compose(overrides)`` is the one way a run's config is made - by the CLI, the tests, the benchmarks and the
experiments - so ``compose([])`` is exactly what ``python -m lrm_train.train`` runs. Because every group is a typed
dataclass, an unknown key (``+`` or not) or a value of the wrong type fails while composing, before any work;
``validate`` then rejects impossible combinations.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
from hydra.core.config_store import ConfigStore

from lrm_train.config_compose import compose_saved, compose_schema
from lrm_train.data import DataConfig
from lrm_train.distributed import DistConfig, EngineName
from lrm_train.models import PRESETS, FalconH1Config, KernelBackend
from lrm_train.nn import LRMConfig, Parametrization, Placement
from lrm_train.optim import OptimConfig, ScheduleConfig


class Precision(StrEnum):
    """``train.precision``: what the forward and backward compute in (the weights stay float32)."""

    auto = "auto"  # bf16 autocast on CUDA, float32 on CPU
    float32 = "float32"
    bf16 = "bf16"

    def autocast_dtype(self, cuda: bool) -> torch.dtype | None:
        """The dtype the run's autocast computes in on this device; None: no autocast (float32)."""
        return torch.bfloat16 if self is Precision.bf16 or (self is Precision.auto and cuda) else None


class FinalCheckpoint(StrEnum):
    """``train.final_checkpoint``: what the last step's checkpoint holds (the earlier ones always hold everything)."""

    full = "full"  # everything a resume needs: the run can train on if train.max_steps is raised
    # The model and the run's record, without the optimizer's state (a third of the size under AdamW): enough for
    # evaluation, export and init_from, and it ends the run (a resume past it is refused). For runs that are read,
    # never continued, such as the coordinate check's hundreds.
    weights = "weights"


class WandbMode(StrEnum):
    """``logging.wandb.mode``."""

    offline = "offline"  # no network, no account: ``wandb sync`` later
    online = "online"
    disabled = "disabled"


@dataclass
class TrainConfig:
    max_steps: int = 300
    seed: int = 0
    micro_batch_size: int = 8
    grad_accum: int = 1  # global batch = micro_batch_size x grad_accum x world size
    ckpt_every: int = 100
    keep_last: int = 3  # complete checkpoints kept
    # Write checkpoints in a background thread while training goes on (the step waits only for the copy to host memory);
    # off by default: a checkpoint is then complete when its step's callbacks return, as in a synchronous save.
    async_checkpoint: bool = False
    final_checkpoint: FinalCheckpoint = FinalCheckpoint.full
    resume: str = "auto"  # auto (newest complete checkpoint of the run dir, if any), none, or a checkpoint path
    # Weights to start from (a fresh optimizer; read only when the run does not resume): a checkpoint, a run directory,
    # an lrm_train model folder or a Hugging Face Falcon-H1 folder of this run's model.* shape, any LRM placement.
    init_from: str | None = None
    run_dir: str = "runs/${experiment.name}"
    precision: Precision = Precision.auto
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still logged)
    clip_multipliers: bool = False  # the paper leaves multipliers out of the clipped global norm
    z_loss: float = 1e-4
    compile: bool = False  # torch.compile each decoder layer
    activation_checkpointing: bool = False  # recompute each decoder layer in backward instead of keeping activations
    max_bad_steps: int = 5  # non-finite steps in a row before the run stops (with an emergency checkpoint)
    log_every: int = 10
    eval_every: int = 50
    # Validate only at the last N of those steps (0: at all): a run whose final loss is all that is read (an LR sweep's)
    # skips the rest. Validation never changes training, so the runs train the same either way.
    eval_last: int = 0
    eval_batch_size: int = 8
    stop_at_step: int = 0  # stop this process after this step as if preempted (0: never); for drills and tests


@dataclass
class WandbConfig:
    mode: WandbMode = WandbMode.offline
    project: str = "lrm_train"
    entity: str | None = None
    group: str | None = None  # runs of one experiment (e.g. a comparison) share a group


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True  # progress bar on rank 0
    peak_tflops: float = 989.0  # per device, for MFU (H100 SXM dense bf16)
    trajectories: bool = True  # multiplier values, matrix norms and the ABM prediction every log step


@dataclass
class ExperimentConfig:
    name: str = "default"
    tags: list[str] = field(default_factory=list)


@dataclass
class EvalConfig:
    """Downstream tasks scored in the loop (lm-evaluation-harness; none by default). With tasks, ``build_callbacks``
    attaches the evaluation callback (``callbacks.downstream``) with these arguments; without, nothing of the harness
    is imported."""

    tasks: list[str] = field(default_factory=list)  # harness task names, e.g. [arc_easy, piqa]
    limit: int = 100  # the first N items of each task: the same fixed subset at every evaluation
    every: int = 100  # steps between evaluations (and at the end)
    batch_size: int = 8

    def __post_init__(self) -> None:
        for name in ("limit", "every", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name}={getattr(self, name)} must be >= 1")


@dataclass
class RunConfig:
    """Everything a run is. ``callbacks``: extra callbacks by name, each ``{_target_: module.Class, **kwargs}``."""

    model: FalconH1Config = field(default_factory=FalconH1Config)
    lrm: LRMConfig = field(default_factory=LRMConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    callbacks: dict[str, Any] = field(default_factory=dict)


def register_configs() -> None:
    store = ConfigStore.instance()
    for name, make in PRESETS.items():  # the Python presets are the model group's options
        store.store(group="model", name=name, node=make())


def compose(overrides: list[str] | tuple[str, ...] = (), saved: Path | None = None) -> RunConfig:
    """The run config of ``configs/train.yaml`` with Hydra ``overrides``, checked and validated; or, given ``saved``
    (a run's ``config.yaml``), that config with the ``key=value`` overrides: how a run is relaunched as it was.

    Raises ``ValueError`` with one line naming the culprit for every config error.
    """
    register_configs()
    cfg = compose_schema("train", RunConfig, overrides) if saved is None else compose_saved(saved, RunConfig, overrides)
    validate(cfg)
    return cfg


def _wandb_key_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def _cuda_device(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def validate(cfg: RunConfig) -> None:
    """Reject impossible combinations with one line naming the keys."""
    t = cfg.train
    for name in (
        "max_steps",
        "micro_batch_size",
        "grad_accum",
        "ckpt_every",
        "keep_last",
        "log_every",
        "eval_every",
        "eval_batch_size",
        "max_bad_steps",
    ):
        if getattr(t, name) < 1:
            raise ValueError(f"train.{name}={getattr(t, name)} must be >= 1")
    if t.eval_last < 0:
        raise ValueError(f"train.eval_last={t.eval_last} must be >= 0 (0: validate at every train.eval_every steps)")
    if cfg.logging.wandb.mode is WandbMode.online and not _wandb_key_available():
        raise ValueError(
            "logging.wandb.mode=online but no W&B API key was found: set WANDB_API_KEY or run `wandb login` "
            "(or keep logging.wandb.mode=offline and `wandb sync` later)"
        )
    if cfg.model.ssd_backend is KernelBackend.triton and not _cuda_device(cfg.dist.device):
        raise ValueError("model.ssd_backend=triton needs a CUDA device (use model.ssd_backend=auto or torch on CPU)")
    if cfg.model.lm_loss_backend is KernelBackend.triton and not _cuda_device(cfg.dist.device):
        raise ValueError(
            "model.lm_loss_backend=triton needs a CUDA device (use model.lm_loss_backend=auto or torch on CPU)"
        )
    if t.init_from is not None and not os.path.exists(t.init_from):
        raise ValueError(f"train.init_from={t.init_from}: no such checkpoint, run directory or model folder")
    form = cfg.model.parametrization
    if form.value.startswith("mup_multiplier_") and form.value != f"mup_multiplier_{cfg.optim.name}":
        raise ValueError(
            f"model.parametrization={form} carries the width scaling of another optimizer's update than "
            f"optim={cfg.optim.name}: use model.parametrization=mup_multiplier_{cfg.optim.name} or mup"
        )
    if cfg.optim.hidden_lr_exponent is not None and form is not Parametrization.mup:
        raise ValueError(
            f"optim.hidden_lr_exponent={cfg.optim.hidden_lr_exponent} scales LRs with width, which only "
            f"model.parametrization=mup does (this run: {form})"
        )
    if t.grad_clip < 0:
        raise ValueError(f"train.grad_clip={t.grad_clip} must be >= 0 (0 disables clipping)")
    if cfg.schedule.warmup_steps < 0:
        raise ValueError(f"schedule.warmup_steps={cfg.schedule.warmup_steps} must be >= 0")
    if cfg.schedule.batch_ramp_steps and t.grad_accum < 2:
        raise ValueError(
            "schedule.batch_ramp_steps needs train.grad_accum >= 2: the ramp grows the batch in micro-batches"
        )
    if cfg.lrm.placement is Placement.none and cfg.lrm.lm_head_rows:
        raise ValueError("lrm.lm_head_rows=true needs a placement other than lrm.placement=none")
    if cfg.data.seq_len < 2:
        raise ValueError(f"data.seq_len={cfg.data.seq_len} must be >= 2")
    if t.compile and cfg.dist.name is EngineName.zero3:
        raise ValueError(
            "train.compile=true does not work with dist=zero3 (ZeRO-3 gathers the parameters inside the compiled "
            "layers); use dist=fsdp, zero1, zero2 or ddp, or train.compile=false"
        )
