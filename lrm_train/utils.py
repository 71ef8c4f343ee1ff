"""Small helpers shared by every layer of the package."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

# ``.tmp-{name}@{host}-{pid}-{random}``: host and pid say whether the writer may still be alive (on a shared
# file system, a temporary of another machine is never judged from here).
_TMP = re.compile(r"^\.tmp-.+@(.+)-(\d+)-[0-9a-f]{8}$")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``path`` only if the block completes.

    An interrupted writer leaves a ``.tmp-*`` directory behind, never something that looks like a finished ``path``;
    ``remove_stale_temporaries`` clears those at the next start.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}@{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def check_replaceable(
    path: str | os.PathLike,
    overwrite: bool,
    foreign_content: Callable[[Path], str | None],
    sources: Iterable[str | os.PathLike] = (),
) -> None:
    """Raise one ``FileExistsError`` line naming ``path`` unless writing there would delete nothing a user owns.

    A missing path or an empty folder is free to take. Anything else needs ``overwrite`` and must be a folder in
    which ``foreign_content`` finds nothing (it returns what shows the folder is not ours, or None). Whatever the
    flag, the current directory, the home directory, the sources being read and every folder holding one of them
    are never replaced.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    target = path.resolve()
    protected = {Path.cwd().resolve(): "the current directory", Path.home().resolve(): "the home directory"}
    protected.update({Path(source).resolve(): f"the source {source}" for source in sources})
    for kept, what in protected.items():
        if target == kept:
            raise FileExistsError(f"refusing to replace {path}: it is {what}")
        if target in kept.parents:
            raise FileExistsError(f"refusing to replace {path}: it holds {what}")
    if path.is_symlink() or not path.is_dir():
        raise FileExistsError(f"refusing to replace {path}: it is not a folder")
    if not any(path.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
    reason = foreign_content(path)
    if reason:
        raise FileExistsError(f"refusing to replace {path}: lrm_train did not write it ({reason})")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the ``.tmp-*`` directories that ``atomic_directory`` writers on this machine left when they died.

    Only this machine's writers are judged (a dead pid here says nothing of another host's).

    A temporary whose writer is still running (its pid is alive) is left alone. Returns what was removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for child in folder.iterdir():
        match = _TMP.match(child.name)
        if not match or not child.is_dir() or match.group(1) != socket.gethostname():
            continue
        if not _alive(int(match.group(2))):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return sorted(removed)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()
