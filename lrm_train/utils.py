"""Small helpers shared by every layer of the package."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import socket
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

# ``.tmp-{name}@{host}-{pid}-{random}``: host and pid say whether the writer may still be alive (on a shared
# file system, a temporary of another machine is never judged from here).
_TMP = re.compile(r"^\.tmp-.+@(.+)-(\d+)-[0-9a-f]{8}$")


# Failures of the disk rather than of the data: they become one line naming the destination, not a traceback.
_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
# Writers in Rust (safetensors) keep the OS error only in their message.
_OS_ERROR_TEXT = re.compile(r"\(os error (\d+)\)")


class AtomicDirectory:
    """A temporary sibling directory that becomes ``path`` on ``commit``; ``discard`` removes it.

    The two halves of ``atomic_directory`` for a writer whose folder is filled over time or by several processes (a
    sharded checkpoint: every rank writes its files into ``tmp``, rank 0 commits once all of them are flushed).
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        path = self.path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists")
        blocking_file = next((p for p in reversed(path.parents) if p.exists() and not p.is_dir()), None)
        if blocking_file is not None:
            raise _cannot_write(path, f"{blocking_file} is not a folder", errno.ENOTDIR)
        self.tmp = path.parent / f".tmp-{path.name}@{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with naming_the_destination(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir()

    def commit(self) -> Path:
        """Flush everything in ``tmp`` and rename it to ``path`` (replacing an older ``path``)."""
        try:
            with naming_the_destination(self.path):
                _usual_permissions(self.tmp)
                _flush_tree(self.tmp)
                if self.path.exists():
                    shutil.rmtree(self.path)
                os.replace(self.tmp, self.path)
                _flush(self.path.parent)
        finally:
            self.discard()
        return self.path

    def discard(self) -> None:
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``path`` only if the block completes.

    Durable: every file and folder written is flushed to disk before the rename and the parent after it, so a crash
    or power cut leaves either the previous ``path`` or the complete new one. A full disk, a read-only file system or
    a permission error becomes one ``OSError`` line naming ``path`` (its ``errno`` kept).

    An interrupted writer leaves a ``.tmp-*`` directory behind, never something that looks like a finished ``path``;
    ``remove_stale_temporaries`` clears those at the next start.
    """
    folder = AtomicDirectory(path, overwrite)
    try:
        with naming_the_destination(folder.path):
            yield folder.tmp
        folder.commit()
    finally:
        folder.discard()


def fsync_file(path: str | os.PathLike) -> None:
    """Flush one file's data to disk."""
    _flush(Path(path))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``atomic_write_bytes`` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to the file ``path`` as ``atomic_directory`` writes a folder: into a temporary sibling, flushed,
    renamed over ``path``, the parent flushed; a reader (or a crash) finds the previous file or the new one, never
    half of one. Any failure is one ``OSError`` line naming ``path`` (its ``errno`` kept) and leaves no temporary."""
    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}@{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _flush(path.parent)
    except OSError as e:
        raise _cannot_write(path, e.strerror or str(e), e.errno) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _usual_permissions(folder: Path) -> None:
    """Give everything under ``folder`` (and itself) the modes a plain ``open``/``mkdir`` would under the umask:
    safetensors writes its files 0600, which other users of a shared cluster (and a group's jobs) could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _flush(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _flush_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder``, ``folder`` itself last."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            _flush(Path(root) / name)
        _flush(Path(root))


def _cannot_write(path: Path, reason: str, error_number: int) -> OSError:
    error = OSError(f"cannot write {path}: {reason}")
    error.errno = error_number  # callers can still tell a full disk from a read-only one
    return error


def _disk_error_number(error: Exception, folder: Path) -> int | None:
    """The errno of ``error`` when it is a failure of the disk, else None."""
    if isinstance(error, OSError):
        number = error.errno
    elif match := _OS_ERROR_TEXT.search(str(error)):
        number = int(match.group(1))
    elif isinstance(error, RuntimeError) and os.statvfs(folder).f_bavail == 0:
        number = errno.ENOSPC  # torch.save reports a full disk as a RuntimeError about stream positions
    else:
        return None
    return number if number in _DISK_ERRORS else None


@contextlib.contextmanager
def naming_the_destination(path: Path) -> Iterator[None]:
    """Turn a failure of the disk (full, read-only, no permission) inside the block into one ``OSError`` line naming
    ``path``; other errors pass unchanged."""
    try:
        yield
    except Exception as error:
        number = _disk_error_number(error, path.parent)
        if number is None:
            raise
        raise _cannot_write(path, os.strerror(number), number) from None


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


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first non-empty line (its type's name when it has none)."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def stderr_line(text: str) -> None:
    """Write ``text`` and its newline to stderr in one write. Under torchrun every rank shares the stream, and
    unbuffered Python (PYTHONUNBUFFERED, common under Slurm and CI) writes ``print``'s text and its newline separately,
    so two ranks' lines would run together."""
    sys.stderr.write(text + "\n")
