"""A scheduler's stop signal, turned into a checkpoint at the next step boundary.

Slurm sends SIGTERM on preemption and ``scancel`` (and SIGUSR1, or any signal, early when asked with ``--signal``),
then SIGKILL after a grace period; torchrun passes a SIGTERM it receives on to its workers and kills them 30 s later.
While the loop runs, ``StopSignals`` records such a signal instead of dying on it; after each step the ranks agree
(one host-side max over ranks) whether any of them received one, and then every rank stops at the same step, so the
collective checkpoint save can run. A second signal acts as it normally would.
"""

from __future__ import annotations

import signal
import threading
from typing import ClassVar

from lrm_train.cli import CommandEnding

# What a stop request makes the process exit with: 128 + the signal, as a shell reports a process the signal ended,
# so Slurm and wrappers that requeue on "killed by SIGTERM" (e.g. RequeueExit=143) treat a saved stop the same way.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Stopped(CommandEnding):
    """The run stopped on a signal after saving a checkpoint; it exits with 128 + the signal, as Slurm expects."""

    word = "stopped"

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    """While entered (on the main thread), SIGTERM and SIGUSR1 are recorded in ``received`` (0: none yet).

    One entered inside another (a run's training loop inside an experiment that trains its runs one after another)
    shares what they record: it starts with a signal the outer one has already received, and a signal it records
    reaches the outer one too. So a signal that lands while a run starts, or in a run's last step (which the run
    finishes), still stops what runs the runs, instead of being lost with the run's handler."""

    _entered: ClassVar[list[StopSignals]] = []  # those entered on the main thread, outermost first

    def __init__(self) -> None:
        self.received = 0
        self._previous: dict[int, object] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python handles signals on the main thread only
            self.received = next((outer.received for outer in StopSignals._entered if outer.received), 0)
            if not self.received:  # else the handlers are already back to what they were: a second signal acts
                self._previous = {sig: signal.signal(sig, self._record) for sig in STOP_SIGNALS}
            StopSignals._entered.append(self)
        return self

    def _record(self, signum: int, _frame) -> None:
        for entered in StopSignals._entered:
            entered.received = entered.received or signum
        for entered in reversed(StopSignals._entered):  # the next one is not deferred: a user who insists gets the
            entered._restore()  # usual behaviour

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *_exc) -> None:
        self._restore()
        if self in StopSignals._entered:
            StopSignals._entered.remove(self)
