"""The run directory: created (or refused) before any work, locked against a second trainer, logged into.

A run directory belongs to one trainer at a time: rank 0 holds an exclusive ``fcntl`` lock on ``run.lock`` for the
whole run. The kernel drops the lock when the process dies, so a crashed run never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from pathlib import Path

from lrm_train.distributed import Engine
from lrm_train.train.checkpoint import checkpoint_root
from lrm_train.utils import remove_stale_temporaries

log = logging.getLogger("lrm_train")
LOCK_FILE = "run.lock"


class RunDirectory:
    def __init__(self, path: str | os.PathLike, engine: Engine) -> None:
        self.path = Path(path)
        self.engine = engine
        self._lock = None
        outcome = self._open() if engine.is_main else ""
        error = engine.all_gather_object(outcome)[0]  # every rank fails with rank 0's line
        if error:
            self.close()
            raise ValueError(error)
        self._setup_logging()
        if engine.is_main:
            for leftover in remove_stale_temporaries(checkpoint_root(self.path)):
                log.info("removed %s, left by an interrupted checkpoint save", leftover)

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
            log.addHandler(logging.StreamHandler())

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
