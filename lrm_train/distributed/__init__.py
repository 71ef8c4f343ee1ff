"""Engines behind one small interface (single process, DDP); the loop never branches on which one runs."""

from lrm_train.distributed.engine import (
    DDPEngine,
    DistConfig,
    Engine,
    EngineName,
    ProcessBackend,
    build_engine,
    exit_without_shutdown,
    launched_world_size,
)

__all__ = [
    "DDPEngine",
    "DistConfig",
    "Engine",
    "EngineName",
    "ProcessBackend",
    "build_engine",
    "exit_without_shutdown",
    "launched_world_size",
]
