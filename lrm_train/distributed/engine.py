"""Engines: how a model is wrapped, how gradients are accumulated and synchronized, how a step is taken.

The training loop talks to this small interface only, so it never branches on the engine type:

    optimizer = engine.setup(model, optimizer, classes)   # the optimizer whose param_groups the schedule drives
    with engine.accumulating(last=...):                  # gradient sync only on the last micro-batch
        engine.backward(loss)
    norms, applied = engine.optimizer_step(max_norm, loss_is_finite)   # device tensors: no host sync
    engine.model_state() / engine.optimizer_state()      # full, named: the same state for every engine
    engine.model_shards() / engine.optimizer_shards()    # this rank's pieces of them, for a sharded checkpoint
    engine.parameter_shapes()                            # full shapes by name (ZeRO-3 partitions the tensors)

Each engine owns a process group (``LocalProcess``, or ``LaunchedProcessGroup`` under a launcher) for rank, world
size and the few collectives the loop needs.

``single`` runs one process; ``ddp`` runs under ``torchrun`` with DistributedDataParallel (gloo on CPU, NCCL on CUDA);
``zero1``/``zero2``/``zero3`` run DeepSpeed ZeRO (``distributed/zero.py``); ``fsdp`` runs torch's FSDP2
(``distributed/fsdp.py``).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import sys
from dataclasses import dataclass
from enum import StrEnum

import torch
import torch.distributed as dist
from torch import nn

from lrm_train.optim import GradNorms, ParamClass, class_table, clipped_norm, is_clipped


class EngineName(StrEnum):
    """``dist.name``: the engine a run trains with (see the module docstring)."""

    single = "single"
    ddp = "ddp"
    zero1 = "zero1"
    zero2 = "zero2"
    zero3 = "zero3"
    fsdp = "fsdp"

    @property
    def zero_stage(self) -> int | None:
        """The DeepSpeed ZeRO stage of a ``zero*`` engine; None for the others."""
        return _ZERO_STAGES.get(self)


_ZERO_STAGES = {EngineName.zero1: 1, EngineName.zero2: 2, EngineName.zero3: 3}


class ProcessBackend(StrEnum):
    """``dist.backend``: the ``torch.distributed`` backend of a launched run."""

    auto = "auto"  # nccl on CUDA, gloo on CPU
    gloo = "gloo"
    nccl = "nccl"


@dataclass
class DistConfig:
    name: EngineName = EngineName.single
    backend: ProcessBackend = ProcessBackend.auto
    device: str = "auto"  # auto: cuda when available, else cpu
    timeout_minutes: int = 30
    zero3_persistence_threshold: int = 100_000  # ZeRO-3 keeps parameters smaller than this whole on every rank
    # ZeRO only: the model's parameters (and gradients) in bf16, float32 master weights in the optimizer's shards.
    bf16_params: bool = False

    def __post_init__(self) -> None:
        # Built from plain strings too (DistConfig(name="ddp")): keep the enums.
        for key, choices in (("name", EngineName), ("backend", ProcessBackend)):
            value = getattr(self, key)
            if value not in set(choices):
                raise ValueError(f"dist.{key}={value!r} is not one of {', '.join(choices)}")
            setattr(self, key, choices(value))
        if self.bf16_params and self.name.zero_stage is None:
            raise ValueError(
                f"dist.bf16_params=true needs a ZeRO engine (dist.name=zero1|zero2|zero3), not {self.name}"
            )


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def step_is_finite(loss_is_finite: torch.Tensor, grad_norms: list[torch.Tensor]) -> torch.Tensor:
    """The rule of every engine: a step is applied only if the loss and every gradient - all classes, multipliers
    included - are finite. A non-finite entry makes its group's norm non-finite, so the norms decide it.

    The answer is a 0-d bool tensor on the device, never read by the host here: the optimizers skip the update on the
    device (``apply``), and the loop reads the flags only at log steps."""
    return loss_is_finite & torch.isfinite(torch.stack(grad_norms)).all()


@dataclass
class TensorPiece:
    """Elements ``[offset, offset + values.numel())`` of the flattened tensor ``name``, whose full shape is ``shape``:
    what one rank holds of a tensor, enough to put the full tensor back together from every rank's pieces."""

    name: str
    shape: tuple[int, ...]
    offset: int
    values: torch.Tensor

    @property
    def whole(self) -> bool:
        return self.offset == 0 and self.values.numel() == math.prod(self.shape)


def whole_pieces(state: dict[str, torch.Tensor]) -> list[TensorPiece]:
    return [TensorPiece(name, tuple(t.shape), 0, t) for name, t in state.items()]


def optimizer_piece_name(param: str, key: str) -> str:
    """The name of a parameter's optimizer state entry in a sharded checkpoint (parameter names have no ``/``)."""
    return f"{param}/{key}"


class LocalProcess:
    """The process group of a run without a launcher: one rank, nothing to communicate."""

    rank, world_size, local_rank = 0, 1, 0

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_gather_object(self, obj) -> list:
        return [obj]

    def max_over_ranks(self, values: list[int]) -> list[int]:
        return [int(v) for v in values]

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class LaunchedProcessGroup:
    """The ranks a launcher (torchrun, deepspeed) started, joined through ``torch.distributed``."""

    def __init__(self, cfg: DistConfig, device: torch.device) -> None:
        backend = cfg.backend
        if backend is ProcessBackend.auto:
            backend = ProcessBackend.nccl if device.type == "cuda" else ProcessBackend.gloo
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=cfg.timeout_minutes))
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        # Host-side agreements (a stop signal seen by some ranks) go through gloo, so they never wait for the GPU.
        self.host_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor / self.world_size

    def all_gather_object(self, obj) -> list:
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def max_over_ranks(self, values: list[int]) -> list[int]:
        tensor = torch.tensor([int(v) for v in values])
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.host_group)
        return tensor.tolist()

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def exit_without_shutdown(status: int) -> None:
    """End a rank whose work is saved and closed, skipping interpreter shutdown: there, torch's gloo threads can abort
    the process after a run that succeeded (README, "Known issue: a rare SIGABRT when a rank exits")."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _device(cfg: DistConfig, local_rank: int) -> torch.device:
    if cfg.device != "auto":
        return torch.device(cfg.device)
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def launched_process_group(cfg: DistConfig) -> tuple[LaunchedProcessGroup, torch.device]:
    """Join the launcher's ranks on this rank's device (set as the current CUDA device)."""
    if "RANK" not in os.environ:
        raise ValueError(f"dist={cfg.name} needs a launcher that sets RANK/WORLD_SIZE: run under torchrun or deepspeed")
    device = _device(cfg, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return LaunchedProcessGroup(cfg, device), device


class Engine:
    """One process by default; the DDP and ZeRO engines extend it with a launched process group and a wrapper."""

    def __init__(self, cfg: DistConfig, group: LocalProcess | LaunchedProcessGroup | None = None, device=None) -> None:
        self.cfg = cfg
        self.group = group or LocalProcess()
        self.device = device or _device(cfg, self.group.local_rank)
        self.module: nn.Module | None = None  # the unwrapped model
        self.model: nn.Module | None = None  # what the loop calls forward on
        self.optimizer = None
        self.clip_params: list[torch.Tensor] = []
        self.class_params: dict[ParamClass, list[torch.Tensor]] = {}

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def world_size(self) -> int:
        return self.group.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce_mean(tensor)

    def all_gather_object(self, obj) -> list:
        return self.group.all_gather_object(obj)

    def max_over_ranks(self, values: list[int]) -> list[int]:
        """Each of ``values`` (host integers or bools) maxed over the ranks: one host-side collective, no device sync."""
        return self.group.max_over_ranks(values)

    def barrier(self) -> None:
        self.group.barrier()

    def close(self) -> None:
        self.group.close()

    def setup(
        self,
        model: nn.Module,
        optimizer,
        classes: dict[str, ParamClass],
        clip_multipliers: bool = False,
        autocast: torch.dtype | None = None,
    ):
        """Take the model and its optimizer; return the optimizer whose ``param_groups`` the schedule drives.
        ``autocast``: the dtype the trainer's autocast computes in (None: float32), for the engines that must match it
        themselves (ZeRO's forward, FSDP's gathered copies); the trainer's loop enters the autocast."""
        self.module = self.model = model
        self.optimizer = optimizer
        self.names = {id(p): n for n, p in model.named_parameters()}
        params = dict(model.named_parameters())
        self.clip_multipliers = clip_multipliers
        self.clip_params = [params[n] for n, c in classes.items() if is_clipped(c, clip_multipliers)]
        self.class_params = {}
        for name, cls in classes.items():
            self.class_params.setdefault(cls, []).append(params[name])
        return optimizer

    def accumulating(self, last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self, max_norm: float, loss_is_finite: torch.Tensor) -> tuple[GradNorms, torch.Tensor]:
        """Step unless ``step_is_finite`` says no, after clipping (``max_norm`` > 0) on the global norm of the clipped
        classes (``optim.clipped_norm``); gradients are cleared either way. Returns (the norms before clipping, whether
        it stepped), tensors on the device: nothing here waits for the device."""
        norms = []
        for cls, params in self.class_params.items():
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                norms.append((cls, torch.nn.utils.get_total_norm(grads, foreach=True)))
        grad_norms = clipped_norm(norms, self.clip_multipliers, max_norm)
        applied = step_is_finite(loss_is_finite.to(grad_norms.clipped.device), [n for _, n in norms])
        if grad_norms.scale is not None:  # a non-finite norm makes the gradients non-finite: the step is skipped then
            grads = [p.grad for p in self.clip_params if p.grad is not None]
            torch._foreach_mul_(grads, grad_norms.scale)
        self.optimizer.step(apply=applied)
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norms, applied

    def class_rows(self) -> list[dict]:
        """The parameter-group table (group, count, numel, optimizer, lr, wd) from what the engine holds."""
        return class_table(self.optimizer)

    def parameter_shapes(self) -> dict[str, torch.Size]:
        """Every parameter's full shape by name, whatever the engine holds (ZeRO-3 frees the full tensors)."""
        return {name: p.shape for name, p in self.module.named_parameters()}

    def gathered(self):
        """A context in which every parameter of the model is whole (ZeRO-3 partitions them otherwise)."""
        return contextlib.nullcontext()

    def model_state(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)

    def optimizer_state(self) -> dict[str, dict]:
        """Parameter name -> its optimizer state, as full tensors (independent of the engine and world size)."""
        return {self.names[id(p)]: dict(state) for p, state in self.optimizer.state.items()}

    def model_shards(self) -> list[TensorPiece]:
        """This rank's part of the model state for a sharded checkpoint (collective): together, the ranks' pieces
        cover every tensor of ``model_state`` once. By default rank 0 gives it whole and the others nothing, which is
        right for replicated engines and correct (if not sharded) for any engine with a ``model_state``."""
        state = self.model_state()
        return whole_pieces(state) if self.is_main else []

    def optimizer_shards(self) -> list[TensorPiece]:
        """As ``model_shards``, for ``optimizer_state`` (pieces named by ``optimizer_piece_name``)."""
        state = self.optimizer_state()
        if not self.is_main:
            return []
        return whole_pieces({optimizer_piece_name(n, k): v for n, entry in state.items() for k, v in entry.items()})

    def load_optimizer_state(self, state: dict[str, dict]) -> None:
        params = dict(self.module.named_parameters())
        for name, param_state in state.items():
            if name not in params:
                raise ValueError(f"optimizer state for {name!r}, which this model does not have")
            self.optimizer.load_param_state(params[name], param_state)


class DDPEngine(Engine):
    """DistributedDataParallel: every rank holds the whole model and optimizer; gradients are all-reduced."""

    def __init__(self, cfg: DistConfig) -> None:
        super().__init__(cfg, *launched_process_group(cfg))

    def setup(
        self,
        model: nn.Module,
        optimizer,
        classes: dict[str, ParamClass],
        clip_multipliers: bool = False,
        autocast: torch.dtype | None = None,
    ):
        optimizer = super().setup(model, optimizer, classes, clip_multipliers, autocast)
        self.model = nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None
        )
        return optimizer

    def accumulating(self, last: bool):
        return contextlib.nullcontext() if last else self.model.no_sync()


def build_engine(cfg: DistConfig) -> Engine:
    launched = launched_world_size()
    if cfg.name is EngineName.single:
        if launched > 1:
            raise ValueError(f"the launcher started {launched} processes but dist=single: use dist=ddp")
        return Engine(cfg)
    if cfg.name is EngineName.ddp:
        return DDPEngine(cfg)
    if cfg.name is EngineName.fsdp:
        from lrm_train.distributed.fsdp import FSDPEngine

        return FSDPEngine(cfg)
    from lrm_train.distributed.zero import ZeroEngine  # imports DeepSpeed, which takes seconds: only when asked for

    return ZeroEngine(cfg)
