"""Engines: how a model is wrapped, how gradients are accumulated and synchronized, how a step is taken.

The training loop talks to this small interface only, so it never branches on the engine type:

    engine.setup(model, optimizer)
    with engine.accumulating(last=...):        # gradient sync only on the last micro-batch
        engine.backward(loss)
    norm = engine.clip_grad_norm(params, max_norm)
    engine.step(); engine.zero_grad()

``single`` runs one process; ``ddp`` runs under ``torchrun`` with DistributedDataParallel (gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

ENGINES = ("single", "ddp")


@dataclass
class DistConfig:
    name: str = "single"
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU
    device: str = "auto"  # auto: cuda when available, else cpu
    timeout_minutes: int = 30

    def __post_init__(self) -> None:
        if self.name not in ENGINES:
            raise ValueError(f"dist.name={self.name!r} is not one of {', '.join(ENGINES)}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"dist.backend={self.backend!r} is not one of auto, gloo, nccl")


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


class Engine:
    """One process, no communication (the base every engine extends)."""

    def __init__(self, cfg: DistConfig) -> None:
        self.cfg = cfg
        self.rank, self.world_size, self.local_rank = 0, 1, 0
        self.device = self._device()
        self.module: nn.Module | None = None  # the unwrapped model
        self.model: nn.Module | None = None  # what the loop calls forward on
        self.optimizer = None

    def _device(self) -> torch.device:
        if self.cfg.device != "auto":
            return torch.device(self.cfg.device)
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def setup(self, model: nn.Module, optimizer) -> None:
        self.module = self.model = model
        self.optimizer = optimizer

    def accumulating(self, last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Global gradient norm of ``params`` (clipped to ``max_norm`` when it is > 0)."""
        grads = [p.grad for p in params if p.grad is not None]
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        return torch.nn.utils.get_total_norm(grads, foreach=True)

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_gather_object(self, obj) -> list:
        return [obj]

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class DDPEngine(Engine):
    """DistributedDataParallel: every rank holds the whole model and optimizer; gradients are all-reduced."""

    def __init__(self, cfg: DistConfig) -> None:
        if "RANK" not in os.environ:
            raise ValueError("dist=ddp needs a launcher that sets RANK/WORLD_SIZE: run under torchrun")
        self.cfg = cfg
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = self._device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if self.device.type == "cuda" else "gloo")
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=cfg.timeout_minutes))
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.module = self.model = None
        self.optimizer = None

    def setup(self, model: nn.Module, optimizer) -> None:
        self.module = model
        self.model = nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None
        )
        self.optimizer = optimizer

    def accumulating(self, last: bool):
        return contextlib.nullcontext() if last else self.model.no_sync()

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor / self.world_size

    def all_gather_object(self, obj) -> list:
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def build_engine(cfg: DistConfig) -> Engine:
    launched = launched_world_size()
    if cfg.name == "single":
        if launched > 1:
            raise ValueError(f"the launcher started {launched} processes but dist=single: use dist=ddp")
        return Engine(cfg)
    return DDPEngine(cfg)
