"""The paper's trajectories every ``log_every`` steps: multiplier values, matrix norms and the Adam-Brownian-motion
prediction of those norms (``train/metrics.py``); the ABM shadow is stepped after every applied step."""

from __future__ import annotations

from lrm_train.train.callbacks.base import Callback, StepResult, due
from lrm_train.train.metrics import AdamBrownianMotion, trajectory_metrics

# The ABM draws its noise from a generator of its own; seed + 1 keeps it apart from the run's data and init streams.
_ABM_SEED_OFFSET = 1


class Trajectories(Callback):
    name = "trajectories"

    def __init__(self, every: int, enabled: bool, init_std: float, seed: int) -> None:
        self.every, self.enabled, self.init_std, self.seed = every, enabled, init_std, seed
        self.abm: AdamBrownianMotion | None = None

    def setup(self, trainer) -> None:
        shapes = trainer.engine.parameter_shapes()
        self.abm = AdamBrownianMotion(
            trainer.optimizer, trainer.cfg.optim, shapes, self.init_std, seed=self.seed + _ABM_SEED_OFFSET
        )

    def on_step(self, trainer, step: StepResult) -> None:
        if step.applied:
            self.abm.step()
        if self.enabled and due(step, self.every):
            with trainer.engine.gathered():
                step.metrics.update(trajectory_metrics(trainer.components.model, self.abm))

    def state_dict(self) -> dict:
        return {"abm": self.abm.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.abm.load_state_dict(state["abm"])
