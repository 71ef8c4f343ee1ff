"""User callbacks that fail, for the trainer's fault cases (``+callbacks.x._target_=faulty_callbacks.Boom``)."""

import os
import signal

from lrm_train.train.callbacks import Callback


class Boom(Callback):
    """Raises ``ZeroDivisionError`` in ``on_step`` at step ``at`` (on rank ``rank`` only, when given)."""

    def __init__(self, at: int, rank: int | None = None) -> None:
        self.at, self.rank = at, rank

    def on_step(self, trainer, step) -> None:
        if step.step == self.at and self.rank in (None, trainer.engine.rank):
            1 / 0  # noqa: B018 - the fault under test


class SignalAt(Callback):
    """Sends this process ``signum`` (SIGTERM by default) in ``on_step`` at step ``at``, as a scheduler would."""

    def __init__(self, at: int, signum: int = signal.SIGTERM) -> None:
        self.at, self.signum = at, signum

    def on_step(self, trainer, step) -> None:
        if step.step == self.at:
            os.kill(os.getpid(), self.signum)
