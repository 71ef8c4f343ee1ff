"""The run directory: created (or refused) before any work, locked against a second trainer, logged into.

A run directory belongs to one trainer at a time: rank 0 holds an exclusive ``fcntl`` lock on ``run.lock`` for the
whole run. The kernel drops the lock when the process dies, so a crashed run never leaves a stale lock behind.

It also holds one run at a time. A run that starts from step 0 (``train.resume=none``, or ``auto`` with no checkpoint
folder to resume) in a directory holding another run's files moves all of them - checkpoints, metrics, config, logs,
the W&B run and its id - into ``previous_runs/<NNN>_<time>/`` first and says so: two runs' records never interleave,
the next launch cannot resume the other run's checkpoint, and nothing is deleted.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from lrm_train.distributed import Engine
from lrm_train.train.checkpoint import checkpoint_root, regular_checkpoint_folders
from lrm_train.utils import remove_stale_temporaries

log = logging.getLogger("lrm_train")
LOCK_FILE = "run.lock"
PREVIOUS_RUNS = "previous_runs"


class RunDirectory:
    def __init__(self, path: str | os.PathLike, engine: Engine, resume: str = "auto") -> None:
        self.path = Path(path)
        self.engine = engine
        self._lock = None
        moved_to = None
        outcome = self._open() if engine.is_main else ""
        if not outcome and engine.is_main and self._starts_over(resume):
            try:
                moved_to = self._move_previous_run()
            except OSError as e:
                outcome = f"train.run_dir={self.path}: cannot move the previous run aside ({e.strerror or e})"
        error = engine.all_gather_object(outcome)[0]  # every rank fails with rank 0's line
        if error:
            self.close()
            raise ValueError(error)
        self._setup_logging()
        if moved_to is not None:
            log.warning("train.run_dir=%s held another run: its files are now in %s", self.path, moved_to)
        if engine.is_main:
            for leftover in remove_stale_temporaries(checkpoint_root(self.path)):
                log.info("removed %s, left by an interrupted checkpoint save", leftover)

    def _starts_over(self, resume: str) -> bool:
        return resume == "none" or (resume == "auto" and not regular_checkpoint_folders(self.path))

    def _move_previous_run(self) -> Path | None:
        """Move another run's files into ``previous_runs/<NNN>_<time>/``; None when there are none (logs alone are not
        a run: a refused start leaves only its log)."""
        entries = [p for p in self.path.iterdir() if p.name not in (LOCK_FILE, PREVIOUS_RUNS)]
        if all(p.name.startswith("train_rank") and p.suffix == ".log" for p in entries):
            return None
        archive = self.path / PREVIOUS_RUNS
        count = len(list(archive.iterdir())) if archive.is_dir() else 0
        target = archive / f"{count + 1:03d}_{time.strftime('%Y%m%d-%H%M%S')}"  # in order, and unique
        target.mkdir(parents=True)
        for entry in entries:
            os.replace(entry, target / entry.name)  # a rename within the folder: nothing is copied or lost
        return target

    def _open(self) -> str:
        """Create and lock the folder; an error line, or '' when this trainer owns it now."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            lock = open(self.path / LOCK_FILE, "a+")  # noqa: SIM115 - held open for the whole run
        except OSError as e:
            return f"train.run_dir={self.path}: cannot use it as a run directory ({e.strerror or e})"
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            return f"train.run_dir={self.path} is in use by another trainer ({holder}); give this run another train.run_dir"
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        self._lock = lock
        return ""

    def _setup_logging(self) -> None:
        log.setLevel(logging.INFO)
        log.propagate = False
        self._close_handlers()
        file_handler = logging.FileHandler(self.path / f"train_rank{self.engine.rank}.log")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(file_handler)
        if self.engine.is_main:
            console = logging.StreamHandler()
            console.addFilter(lambda record: getattr(record, "console", True))  # lines for the log file only
            log.addHandler(console)

    @staticmethod
    def _close_handlers() -> None:
        for handler in list(log.handlers):
            log.removeHandler(handler)
            handler.close()

    def close(self) -> None:
        self._close_handlers()
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None
