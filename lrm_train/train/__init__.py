"""Training: the run config, the loop, checkpoints, trajectories and metric sinks."""

from lrm_train.train.config import RunConfig, TrainConfig, register_configs
from lrm_train.train.loop import TrainResult, train

__all__ = ["RunConfig", "TrainConfig", "TrainResult", "register_configs", "train"]
