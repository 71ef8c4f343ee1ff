"""Downstream tasks in the training loop: the first ``limit`` items of each task every ``every`` steps (and at the
end), scored by lm-evaluation-harness, logged as ``eval/<task>/<metric>``.

``train.callbacks.build_callbacks`` attaches it as ``callbacks.downstream`` when ``eval.tasks`` is set, its arguments
taken from the ``eval.*`` keys; a run without tasks does not import this module (nor the harness).

Every rank takes part: each scores its share of the requests and all receive every result, so all ranks report the
same numbers.
"""

from __future__ import annotations

import torch

from lrm_train.eval.model import LRMHarnessLM
from lrm_train.eval.scoring import run_harness
from lrm_train.eval.tasks import task_specs
from lrm_train.train.callbacks.base import Callback, StepResult, due


class DownstreamEval(Callback):
    name = "downstream"

    def __init__(self, tasks: list[str], limit: int = 100, every: int = 100, batch_size: int = 8) -> None:
        self.tasks, self.limit, self.every, self.batch_size = list(tasks), limit, every, batch_size
        self.lm: LRMHarnessLM | None = None
        # The scores of the last evaluation and its step: kept across resume, so a run resumed after its final
        # evaluation does not score again.
        self.last_step, self.last_scores = 0, {}

    def setup(self, trainer) -> None:
        task_specs(self.tasks)  # an unknown name stops the run here, before any step

    def on_step(self, trainer, step: StepResult) -> None:
        if self.tasks and due(step, self.every) and step.step != self.last_step:
            self.last_scores, self.last_step = self.evaluate(trainer), step.step
            for task, metrics in self.last_scores.items():
                for metric, value in metrics.items():
                    step.metrics[f"eval/{task}/{metric}"] = value

    @torch.no_grad()
    def evaluate(self, trainer) -> dict:
        if self.lm is None:
            engine = trainer.engine
            self.lm = LRMHarnessLM(
                model=trainer.components.model,
                tokenizer=str(trainer.components.data.tokenizer_path),
                device=str(engine.device),
                batch_size=self.batch_size,
                autocast=trainer.autocast,
                gather=engine.all_gather_object,
                rank=engine.rank,
                world_size=engine.world_size,
            )
        return run_harness(self.lm, self.tasks, self.limit)

    def state_dict(self) -> dict:
        # Nothing before the first evaluation: a run without tasks keeps no downstream entry in its checkpoints.
        return {"last_step": self.last_step, "last_scores": self.last_scores} if self.last_step else {}

    def load_state_dict(self, state: dict) -> None:
        self.last_step, self.last_scores = int(state["last_step"]), dict(state["last_scores"])
