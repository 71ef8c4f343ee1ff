"""What every command shares: ``--help``, the refusal of an option it does not know, ``key=value`` arguments
composed by Hydra over a dataclass schema (``config_compose``), and one table of exit statuses.

| status   | when                                                                                              |
|----------|---------------------------------------------------------------------------------------------------|
| 0        | done                                                                                              |
| 2        | bad input (a config key, a path, a corrupt file), the OS refused (full disk, no permission), or a  |
|          | user's callback failed: one ``error:`` line naming the culprit, before any work where it can be    |
| 3        | the work ran and failed (a run diverged): one ``error:`` line saying what was kept                 |
| 130      | interrupted (Ctrl-C): one line saying what was kept                                              |
| 128 + N  | stopped by signal N (SIGTERM: 143) after saving: ``stopped:`` and where to resume from             |

It sits beside the packages (like ``utils``), so every package's command uses it; the trainer's own endings
(``Stopped``, ``Interrupted``, ``CallbackFailed``) are ``CommandEnding``s that carry their status.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence

from lrm_train.utils import stderr_line

BAD_INPUT = 2
FAILED = 3
INTERRUPTED = 130
# How long a rank other than 0 waits, on a config error, for rank 0 to write the job's line. torchrun stops every rank
# as soon as one exits non-zero, so a rank 1 that exited first could kill rank 0 before its line (seen under load in
# CI); waiting lets rank 0's exit end the job. The bound covers launchers that do not stop the other ranks.
RANK_ZERO_REPORT_WAIT_S = 60.0


class CommandEnding(Exception):
    """An ending that is not a crash: it says what happened (and what was kept) and carries its exit status."""

    exit_code = FAILED
    word = "error"  # what the line starts with


class Interrupted(CommandEnding):
    """Ctrl-C (or SIGTERM where a command treats it so), with a line saying what was kept."""

    exit_code = INTERRUPTED


def exit_status(work: Callable[[], object], again: str = "") -> int:
    """Run ``work``; return its exit status (the table above), with what ended it as one line on stderr. ``again``
    follows the line of an interruption or a stop, for commands that go on when run again."""
    try:
        work()
    except CommandEnding as e:
        resumable = e.exit_code == INTERRUPTED or e.exit_code > 128
        stderr_line(f"{e.word}: {e}" + (f"; {again}" if again and resumable else ""))
        return e.exit_code
    except KeyboardInterrupt:
        stderr_line("error: interrupted" + (f"; {again}" if again else ""))
        return INTERRUPTED
    except (ValueError, OSError) as e:
        stderr_line(f"error: {e}")
        return BAD_INPUT
    except RuntimeError as e:
        stderr_line(f"error: {e}")
        return FAILED
    return 0


def run_command(
    argv: Sequence[str] | None,
    usage: str,
    compose: Callable[[list[str]], object],
    work: Callable[[object, list[str]], object],
    flags: Sequence[str] = (),
    again: str = "",
) -> int:
    """A command's whole life: ``--help`` prints ``usage``; a ``-flag`` not in ``flags`` is refused; ``compose`` makes
    the config from the other arguments (a ``ValueError`` is ``error: config: ...``, status 2, before any work); then
    ``work(config, given_flags)`` under ``exit_status``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(usage)
        return 0
    given = [a for a in argv if a.startswith("-")]
    if unknown := [f for f in given if f not in flags]:
        stderr_line(f"error: unknown option {unknown[0]!r} (see --help)")
        return BAD_INPUT
    try:
        config = compose([a for a in argv if not a.startswith("-")])
    except ValueError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank composes the same config: one line a job
            stderr_line(f"error: config: {e}")
        else:
            time.sleep(RANK_ZERO_REPORT_WAIT_S)
        return BAD_INPUT
    return exit_status(lambda: work(config, given), again)
