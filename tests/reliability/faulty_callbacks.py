"""User callbacks that fail, for the trainer's fault cases (``+callbacks.x._target_=faulty_callbacks.Boom``)."""

import os
import signal
import time

from lrm_train.train.callbacks import Callback


class Boom(Callback):
    """Raises ``ZeroDivisionError`` in ``on_step`` at step ``at`` (on rank ``rank`` only, when given)."""

    def __init__(self, at: int, rank: int | None = None) -> None:
        self.at, self.rank = at, rank

    def on_step(self, trainer, step) -> None:
        if step.step == self.at and self.rank in (None, trainer.engine.rank):
            1 / 0  # noqa: B018 - the fault under test


class SignalAt(Callback):
    """Sends this process ``signum`` (SIGTERM by default) in ``on_step`` at step ``at``, as a scheduler would; at 0, in
    ``on_start`` (the run set up, its loop not yet begun)."""

    def __init__(self, at: int, signum: int = signal.SIGTERM) -> None:
        self.at, self.signum = at, signum

    def on_start(self, trainer) -> None:
        if self.at == 0:
            os.kill(os.getpid(), self.signum)

    def on_step(self, trainer, step) -> None:
        if step.step == self.at:
            os.kill(os.getpid(), self.signum)


class DuringSave(Callback):
    """Acts in the middle of the save of step ``at`` (run with ``train.async_checkpoint=true``, in its background
    write): ``kill`` (SIGKILL, as an OOM killer or a lost node) at ``moment`` = ``first_file`` (one file of the folder
    written), ``files_written`` (every file of this rank written, no manifest), ``manifest_written`` (the manifest
    written, the folder not yet renamed); or ``sigterm`` (a scheduler's stop while the write goes on)."""

    def __init__(self, at: int, moment: str, action: str = "kill") -> None:
        self.folder, self.moment, self.action = f"step_{at:08d}", moment, action

    def setup(self, trainer) -> None:
        from lrm_train.train import checkpoint

        save_pieces, write_rank_files = checkpoint._save_pieces, checkpoint.write_rank_files
        commit = checkpoint.AtomicDirectory.commit

        def act(path, moment):
            if self.folder in str(path) and moment == self.moment:
                if self.action == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.5)  # the write goes on after the signal has been seen

        def patched_save_pieces(path, pieces):
            save_pieces(path, pieces)
            act(path, "first_file")

        def patched_write_rank_files(folder, snap):
            act(folder, "started")
            files = write_rank_files(folder, snap)
            act(folder, "files_written")
            return files

        def patched_commit(folder):
            act(folder.tmp, "manifest_written")
            return commit(folder)

        checkpoint._save_pieces = patched_save_pieces
        checkpoint.write_rank_files = patched_write_rank_files
        checkpoint.AtomicDirectory.commit = patched_commit


class HoldAfterStopSignal(Callback):
    """Once the loop has recorded a SIGTERM (its handler gave the signal back to the one before it, which in a
    parallel experiment's worker ignores it), each step takes ``seconds`` more, and so does the stop's save before it
    writes anything (a signal that lands after this callback's step hook, while the sinks write, is seen by the loop
    at that same step): the window for a second signal."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def _hold_once_stopped(self) -> None:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
            time.sleep(self.seconds)

    def on_step(self, trainer, step) -> None:
        self._hold_once_stopped()

    def state_dict(self) -> dict:  # the save gathers every callback's state before it writes
        self._hold_once_stopped()
        return {}
