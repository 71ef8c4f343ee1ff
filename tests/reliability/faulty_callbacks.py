"""User callbacks that fail, for the trainer's fault cases (``+callbacks.x._target_=faulty_callbacks.Boom``)."""

import os
import signal

from lrm_train.train.callbacks import Callback


class Boom(Callback):
    """Raises ``ZeroDivisionError`` in ``on_step`` at step ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step(self, trainer, step) -> None:
        if step.step == self.at:
            1 / 0  # noqa: B018 - the fault under test


class SignalAt(Callback):
    """Sends this process ``signum`` (SIGTERM by default) in ``on_step`` at step ``at``, as a scheduler would."""

    def __init__(self, at: int, signum: int = signal.SIGTERM) -> None:
        self.at, self.signum = at, signum

    def on_step(self, trainer, step) -> None:
        if step.step == self.at:
            os.kill(os.getpid(), self.signum)
