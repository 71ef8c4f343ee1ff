"""The reliability battery's checks: a command run in process, refused with one line, leaving every file as it was.

A case is a command's ``main(argv)`` with bad input or a fault. ``run_main`` runs it the way a user would (its exit
code, what it printed, and any exception that escaped it, which a user would have seen as a traceback);
``assert_refused`` checks the promise every command makes: a non-zero exit, exactly one ``error:`` line naming the
culprit, no traceback; ``snapshot``/``assert_untouched`` check that nothing that existed before was changed or deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# A line longer than this is not "one clear line" (torch's "Missing key(s)" dumps ran to 3.5 KB); pytest's temporary
# paths, named twice in some lines, take 150 characters of it.
MAX_LINE = 600


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    escaped: str  # the traceback of an exception that escaped main(), or ''

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]


def run_main(main: Callable[[list[str]], int], argv: list[str]) -> Outcome:
    out, err = io.StringIO(), io.StringIO()
    escaped = ""
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 - what a user would see as a traceback
            escaped, code = traceback.format_exc(), 1
    return Outcome(code, out.getvalue(), err.getvalue(), escaped)


def assert_refused(outcome: Outcome, match: str, code: int = 2) -> str:
    """One ``error:`` line matching ``match`` (a regex), exit ``code``, no traceback; returns the line."""
    assert not outcome.escaped, f"an exception escaped:\n{outcome.escaped}"
    assert "Traceback" not in outcome.stderr, outcome.stderr
    assert outcome.code == code, f"exit {outcome.code}, expected {code}; stderr:\n{outcome.stderr}"
    assert len(outcome.error_lines) == 1, f"expected one error line, got:\n{outcome.stderr}"
    line = outcome.error_lines[0]
    assert len(line) <= MAX_LINE, f"error line of {len(line)} characters: {line[:MAX_LINE]}..."
    assert re.search(match, line), f"{line!r} does not match {match!r}"
    return line


def snapshot(*roots: Path) -> dict[Path, str]:
    """sha256 of every file under ``roots`` (a file root: itself)."""
    files = [p for root in roots for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file()]
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def assert_untouched(before: dict[Path, str], ignore: tuple[str, ...] = ()) -> None:
    """Every file of ``before`` still exists with the same bytes (names in ``ignore``, e.g. a log, may change)."""
    after = snapshot(*before) if before else {}
    for path, digest in before.items():
        if path.name in ignore:
            continue
        assert path.is_file(), f"{path} was deleted"
        assert after[path] == digest, f"{path} was changed"
