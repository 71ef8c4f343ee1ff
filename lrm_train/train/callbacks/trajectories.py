"""The paper's trajectories every ``log_every`` steps: multiplier values, matrix norms and the Adam-Brownian-motion
prediction of those norms (``train/metrics.py``).

The ABM shadow takes one step per applied training step, with that step's LR and WD. Whether a step was applied is
known on the device only, so the shadow catches up at log steps (and before a checkpoint) from the flags of the steps
since: one host sync for all of them, the same shadow as stepping it every step.
"""

from __future__ import annotations

import torch

from lrm_train.optim import OptimConfig
from lrm_train.train.callbacks.base import Callback, StepResult, due
from lrm_train.train.metrics import AdamBrownianMotion, matrix_init_stds, trajectory_metrics

# The ABM draws its noise from a generator of its own; seed + 1 keeps it apart from the run's data and init streams.
_ABM_SEED_OFFSET = 1


class Trajectories(Callback):
    name = "trajectories"

    def __init__(self, every: int, enabled: bool, optim: OptimConfig, seed: int) -> None:
        self.every, self.enabled, self.optim, self.seed = every, enabled, optim, seed
        self.abm: AdamBrownianMotion | None = None
        self.pending: list[tuple[torch.Tensor, list]] = []  # (applied flag, LR and WD) of the steps not simulated yet

    def setup(self, trainer) -> None:
        shapes = trainer.engine.parameter_shapes()
        init_stds = matrix_init_stds(trainer.components.model)
        self.abm = AdamBrownianMotion(
            trainer.optimizer, self.optim, shapes, init_stds, seed=self.seed + _ABM_SEED_OFFSET
        )

    def on_step(self, trainer, step: StepResult) -> None:
        self.pending.append((step.applied_on_device, self.abm.hyperparameters()))
        if due(step, self.every):
            self.catch_up()
            if self.enabled:
                with trainer.engine.gathered():
                    step.metrics.update(trajectory_metrics(trainer.components.model, self.abm))

    def catch_up(self) -> None:
        """Step the shadow for the applied steps among the pending ones."""
        if not self.pending:
            return
        applied = torch.stack([flag for flag, _ in self.pending]).tolist()
        for was_applied, (_, hyperparameters) in zip(applied, self.pending):
            if was_applied:
                self.abm.step(hyperparameters)
        self.pending = []

    def state_dict(self) -> dict:
        self.catch_up()
        return {"abm": self.abm.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.abm.load_state_dict(state["abm"])
