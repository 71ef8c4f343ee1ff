"""Checkpoints every ``ckpt_every`` steps (and at the end), keeping the newest ``keep_last``; resume; emergency saves.

Saving is collective (every rank contributes its RNG state, ZeRO its shards); rank 0 writes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lrm_train.train.callbacks.base import Callback, StepResult, due
from lrm_train.train.checkpoint import (
    checkpoint_root,
    load_resumable,
    newest_loadable,
    prune_checkpoints,
    save_checkpoint,
)

log = logging.getLogger("lrm_train")


class Checkpointer(Callback):
    name = "checkpointer"

    def __init__(self, every: int, keep_last: int) -> None:
        self.every, self.keep_last = every, keep_last
        self.last: Path | None = None  # the newest checkpoint written or resumed from

    def on_step(self, trainer, step: StepResult) -> None:
        if due(step, self.every):
            self.save(trainer)

    def save(self, trainer, name: str | None = None) -> Path:
        state = trainer.state_dict()
        model_state = trainer.engine.model_state()
        path = checkpoint_root(trainer.run_dir) / (name or f"step_{trainer.state.step:08d}")
        error = ""
        if trainer.engine.is_main:
            try:
                save_checkpoint(path, model_state, state, trainer.state.step, trainer.components.data.tokenizer_path)
                if name is None:
                    prune_checkpoints(trainer.run_dir, self.keep_last)
            except OSError as e:  # a full disk, say: every rank must stop, not wait for rank 0 forever
                error = str(e)
        error = trainer.engine.all_gather_object(error)[0]  # also the barrier after the write
        if error:
            raise OSError(error)
        self.last = path
        return path

    def save_current(self, trainer) -> Path:
        """The checkpoint of the step the run is at: the one just written or resumed from, or a new one."""
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
