"""A callback for the multi-rank test: every rank writes the downstream scores it logged, and how it shared the work."""

import json
from pathlib import Path

from lrm_train.train.callbacks import Callback


class RecordScores(Callback):
    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_step(self, trainer, step) -> None:
        scores = {key: value for key, value in step.metrics.items() if key.startswith("eval/")}
        if scores:
            downstream = next(c for c in trainer.callbacks if c.name == "downstream")
            record = {"scores": scores, "share": [downstream.lm.share_rank, downstream.lm.share_count]}
            (self.out / f"rank{trainer.engine.rank}_step{step.step}.json").write_text(json.dumps(record))
