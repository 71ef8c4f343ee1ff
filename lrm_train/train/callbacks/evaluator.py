"""Validation loss on the fixed validation windows every ``eval_every`` steps (and at the end), or at the last
``eval_last`` of those steps only.

With ``data.mixture``, each source's loss is ``val_loss/<name>`` and ``val_loss`` is their mean weighted as the
mixture (see ``Components.validation``).

Downstream tasks plug in as further evaluator callbacks reporting ``eval/<task>/<metric>``.
"""

from __future__ import annotations

import torch

from lrm_train.data import TokenSplit, validation_batches
from lrm_train.train.callbacks.base import Callback, StepResult, due


def validation_steps(max_steps: int, every: int, last: int = 0) -> list[int]:
    """The steps a run validates at: every ``every`` steps and at the final one; only the last ``last`` of them when
    ``last`` > 0."""
    steps = [*range(every, max_steps + 1, every), *([max_steps] if max_steps % every else [])]
    return steps[-last:] if last else steps


class Evaluator(Callback):
    name = "evaluator"

    def __init__(self, every: int, batch_size: int, seq_len: int, windows: int, last: int, max_steps: int) -> None:
        self.every, self.batch_size, self.seq_len, self.windows = every, batch_size, seq_len, windows
        self.first = validation_steps(max_steps, every, last)[0] if last else 0
        self.last_loss: float | None = None  # of this process: a resumed run evaluates again at its end

    def on_step(self, trainer, step: StepResult) -> None:
        if step.step >= self.first and due(step, self.every):
            step.metrics.update(self.evaluate(trainer))
            self.last_loss = step.metrics["val_loss"]

    def on_end(self, trainer) -> None:
        if self.last_loss is None and not trainer.failed:  # a finished run resumed: still report where it stands
            self.last_loss = self.evaluate(trainer)["val_loss"]

    def evaluate(self, trainer) -> dict[str, float]:
        """Each validation split's loss under its metric name, and ``val_loss``: their weighted mean."""
        validation = trainer.components.validation
        losses = {metric: self.loss(trainer, split) for metric, (split, _) in validation.items()}
        return {**losses, "val_loss": sum(weight * losses[metric] for metric, (_, weight) in validation.items())}

    @torch.no_grad()
    def loss(self, trainer, split: TokenSplit) -> float:
        engine = trainer.engine
        total = torch.zeros(2, dtype=torch.float64, device=engine.device)
        batches = validation_batches(split, self.seq_len, self.windows, self.batch_size, engine.rank, engine.world_size)
        for x, y in batches:
            with trainer.autocast():
                loss = trainer.components.model(x.to(engine.device), y.to(engine.device)).cross_entropy
            total += torch.stack([loss.double() * y.numel(), torch.tensor(float(y.numel()), device=engine.device)])
        total = engine.all_reduce_mean(total)
        return float(total[0] / total[1])
