"""The callback interface and what one step hands to it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lrm_train.train.loop import Trainer


@dataclass
class StepResult:
    step: int  # the step just taken (1-based: the number of steps done)
    loss: torch.Tensor  # mean cross-entropy over the global batch
    grad_norm: torch.Tensor  # the clipped norm (train.clip_multipliers says what it holds), before clipping
    grad_norm_multipliers: torch.Tensor | None  # the multipliers' own norm; None for a model without multipliers
    applied_on_device: torch.Tensor  # 0-d bool: False when a non-finite loss or gradient skipped the update
    lr: float  # the base learning rate used (schedule x optim.lr)
    tokens: int  # tokens consumed by this step (all ranks)
    seconds: float  # wall time of the step itself
    last: bool  # the run's final step
    metrics: dict = field(default_factory=dict)  # what callbacks report for this step, written by the sinks

    @property
    def applied(self) -> bool:
        """Whether the update was applied. Reading it waits for the device; the trainer's own callbacks read the flags
        only at log steps (``applied_on_device`` keeps them on the device)."""
        return bool(self.applied_on_device)


class Callback:
    name = "callback"  # the key of its state in checkpoints

    def setup(self, trainer: Trainer) -> None:
        pass

    def on_start(self, trainer: Trainer) -> None:
        pass

    def on_step(self, trainer: Trainer, step: StepResult) -> None:
        pass

    def on_end(self, trainer: Trainer) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def due(step: StepResult, every: int) -> bool:
    """Whether a cadence of ``every`` steps fires at this step (the final step always does)."""
    return step.step % every == 0 or step.last
