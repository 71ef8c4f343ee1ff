"""Engines behind one small interface (single process, DDP); the loop never branches on which one runs."""

from lrm_train.distributed.engine import ENGINES, DDPEngine, DistConfig, Engine, build_engine, launched_world_size

__all__ = ["ENGINES", "DDPEngine", "DistConfig", "Engine", "build_engine", "launched_world_size"]
