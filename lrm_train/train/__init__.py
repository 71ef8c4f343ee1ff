"""Training: the run config, components, the loop and its callbacks, checkpoints, trajectories."""

from lrm_train.train.config import RunConfig, TrainConfig, compose, register_configs
from lrm_train.train.loop import Trainer, TrainResult, open_trainer, train

__all__ = ["RunConfig", "TrainConfig", "TrainResult", "Trainer", "compose", "open_trainer", "register_configs", "train"]
