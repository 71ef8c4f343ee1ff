"""``data/share/<name>``: each mixture source's share of the tokens trained on so far, every ``log_every`` steps.

Counted from the rows each step trained on (all of them, or each rank's first micro-batches during a batch ramp),
from step 1 on: the counts are saved in checkpoints, so a resumed run reports what the uninterrupted one would.
"""

from __future__ import annotations

import numpy as np

from lrm_train.train.callbacks.base import Callback, StepResult, due


class MixtureShares(Callback):
    name = "mixture_shares"

    def __init__(self, every: int, seq_len: int) -> None:
        self.every, self.seq_len = every, seq_len
        self.tokens: dict[str, int] = {}

    def setup(self, trainer) -> None:
        self.tokens = dict.fromkeys(trainer.components.loader.names, 0)

    def on_step(self, trainer, step: StepResult) -> None:
        loader, world = trainer.components.loader, trainer.engine.world_size
        per_rank = loader.global_batch // world
        trained_per_rank = step.tokens // (self.seq_len * world)
        trained = np.arange(loader.global_batch) % per_rank < trained_per_rank  # each rank trains its first rows
        counts = np.bincount(loader.source_ids(step.step - 1)[trained], minlength=len(self.tokens))
        for name, count in zip(self.tokens, counts.tolist()):
            self.tokens[name] += count * self.seq_len
        if due(step, self.every):
            total = sum(self.tokens.values())
            step.metrics.update({f"data/share/{name}": tokens / total for name, tokens in self.tokens.items()})

    def state_dict(self) -> dict:
        return {"tokens": dict(self.tokens)}

    def load_state_dict(self, state: dict) -> None:
        self.tokens = dict(state["tokens"])
