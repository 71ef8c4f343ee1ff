"""Downstream tasks in the loop: the first ``eval.limit`` items of each of ``eval.tasks`` every ``eval.every`` steps
(and at the end), scored by lm-evaluation-harness, logged as ``eval/<task>/<metric>``.

Every rank takes part: each scores its share of the requests and all receive every result, so all ranks report the
same numbers. The harness is imported at the first evaluation, never when ``eval.tasks`` is empty.
"""

from __future__ import annotations

import torch

from lrm_train.train.callbacks.base import Callback, StepResult, due
from lrm_train.train.config import EvalConfig


class DownstreamEval(Callback):
    name = "downstream"

    def __init__(self, cfg: EvalConfig) -> None:
        for key in ("limit", "every", "batch_size"):
            if getattr(cfg, key) < 1:
                raise ValueError(f"eval.{key}={getattr(cfg, key)} must be >= 1")
        self.cfg = cfg
        self.lm = None
        # The scores of the last evaluation and its step: kept across resume, so a run resumed after its final
        # evaluation does not score again.
        self.last_step, self.last_scores = 0, {}

    def setup(self, trainer) -> None:
        from lrm_train.eval.tasks import task_specs

        task_specs(self.cfg.tasks)  # an unknown name stops the run here, before any step

    def on_step(self, trainer, step: StepResult) -> None:
        if due(step, self.cfg.every) and step.step != self.last_step:
            self.last_scores, self.last_step = self.evaluate(trainer), step.step
            for task, metrics in self.last_scores.items():
                for metric, value in metrics.items():
                    step.metrics[f"eval/{task}/{metric}"] = value

    @torch.no_grad()
    def evaluate(self, trainer) -> dict:
        from lrm_train.eval import LRMHarnessLM, run_harness

        if self.lm is None:
            engine = trainer.engine
            self.lm = LRMHarnessLM(
                model=trainer.components.model,
                tokenizer=str(trainer.components.data.tokenizer_path),
                device=str(engine.device),
                batch_size=self.cfg.batch_size,
                autocast=trainer.autocast,
                gather=engine.all_gather_object,
                rank=engine.rank,
                world_size=engine.world_size,
            )
        return run_harness(self.lm, self.cfg.tasks, self.cfg.limit)

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "last_scores": self.last_scores}

    def load_state_dict(self, state: dict) -> None:
        self.last_step, self.last_scores = int(state["last_step"]), dict(state["last_scores"])
