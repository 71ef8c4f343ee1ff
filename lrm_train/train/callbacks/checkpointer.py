"""Checkpoints every ``ckpt_every`` steps (and at the end), keeping the newest ``keep_last``; resume; emergency saves.

The end's checkpoint leaves the optimizer's state out under ``train.final_checkpoint=weights``.

Saving is collective: every rank writes its own pieces of the state into one folder, and rank 0 completes it
(``checkpoint.ShardedSave``). With ``train.async_checkpoint`` a regular save only copies the state to host memory at
its step; the files are written in the background while training goes on, and the checkpoint is completed at the
first step boundary at which every rank's write is over (one host-side agreement per step while a write is pending),
or, at the latest, before the next save, a signal's save and at the end of training. A run that dies in between
leaves the previous complete checkpoint the newest valid one.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lrm_train.train.callbacks.base import Callback, StepResult, due
from lrm_train.train.checkpoint import (
    ShardedSave,
    checkpoint_root,
    load_resumable,
    newest_loadable,
    prune_checkpoints,
    snapshot,
)
from lrm_train.train.config import FinalCheckpoint

log = logging.getLogger("lrm_train")


class Checkpointer(Callback):
    name = "checkpointer"

    def __init__(
        self, every: int, keep_last: int, asynchronous: bool = False, final: FinalCheckpoint = FinalCheckpoint.full
    ) -> None:
        self.every, self.keep_last, self.asynchronous, self.final = every, keep_last, asynchronous, final
        self.last: Path | None = None  # the newest checkpoint completed or resumed from
        self.pending: ShardedSave | None = None  # a regular save still being written in the background

    def on_step(self, trainer, step: StepResult) -> None:
        if due(step, self.every):
            weights_only = step.last and self.final is FinalCheckpoint.weights
            self.save(trainer, background=self.asynchronous, weights_only=weights_only)
        elif self.pending is not None and not trainer.engine.max_over_ranks([not self.pending.written()])[0]:
            self.finish_pending(trainer)

    def on_end(self, trainer) -> None:
        if self.pending is None:
            return
        if trainer.failed:  # maybe on this rank alone: no collective is safe, the previous checkpoint stays newest
            self.pending.abandon()
            self.pending = None
        else:
            self.finish_pending(trainer)

    def finish_pending(self, trainer) -> None:
        """Complete the background save, if any (collective)."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        self.completed(trainer, pending.finish(), regular=True)

    def completed(self, trainer, path: Path, regular: bool) -> None:
        if regular and trainer.engine.is_main:
            prune_checkpoints(trainer.run_dir, self.keep_last)
        self.last = path

    def save(self, trainer, name: str | None = None, background: bool = False, weights_only: bool = False) -> Path:
        self.finish_pending(trainer)  # one write at a time, completed in order
        engine = trainer.engine
        state = trainer.state_dict()
        if weights_only:
            state["optimizer"] = None  # what a load reads as "not saved", rather than an empty state to resume with
        snap = snapshot(
            engine.rank,
            engine.model_shards(),
            None if weights_only else engine.optimizer_shards(),
            state if engine.is_main else None,
            trainer.components.data.tokenizer_path,
        )
        path = checkpoint_root(trainer.run_dir) / (name or f"step_{trainer.state.step:08d}")
        save = ShardedSave(engine, path, snap, trainer.state.step, background)
        if background:
            self.pending = save
        else:
            self.completed(trainer, save.finish(), regular=name is None)
        return path

    def save_current(self, trainer) -> Path:
        """The checkpoint of the step the run is at: the one just written or resumed from, or a new one."""
        self.finish_pending(trainer)
        current = checkpoint_root(trainer.run_dir) / f"step_{trainer.state.step:08d}"
        return current if self.last == current else self.save(trainer)

    def save_emergency(self, trainer) -> Path:
        """A checkpoint outside the regular series (``resume=auto`` never picks it): for inspection."""
        return self.save(trainer, name=f"emergency_step_{trainer.state.step:08d}")

    def resume(self, trainer, resume: str) -> None:
        """Load ``resume`` (auto: the newest verifiable checkpoint of the run, if any; none; or a path)."""
        if resume == "none":
            return
        if resume == "auto":
            try:
                found = newest_loadable(trainer.run_dir)
            except ValueError as e:  # starting over would overwrite those checkpoints and the run's metrics
                raise ValueError(
                    f"train.resume=auto: {e}; nothing was changed. "
                    "To start over: train.resume=none (moves the old run aside) or another train.run_dir"
                ) from None
            if found is None:
                return
            path, model_state, state = found
        else:
            path = Path(resume)
            if not path.is_dir():
                raise ValueError(f"train.resume={resume}: no such checkpoint folder")
            model_state, state = load_resumable(path)
        trainer.load_state_dict(state, model_state, path)
        self.last = path
        log.info("resumed from %s at step %d", path, trainer.state.step)
