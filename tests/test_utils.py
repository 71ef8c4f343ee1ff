import errno
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lrm_train.utils import (
    atomic_directory,
    atomic_write_bytes,
    atomic_write_text,
    remove_stale_temporaries,
    stderr_line,
)


def write_two_files(folder: Path) -> None:
    (folder / "a.txt").write_text("a")
    (folder / "sub").mkdir()
    (folder / "sub" / "b.bin").write_bytes(b"b")


def test_files_and_folders_are_flushed_before_the_rename_and_the_parent_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(src).resolve()))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with atomic_directory(tmp_path / "out") as tmp:
        write_two_files(tmp)
        tmp = tmp.resolve()
    renamed = events.index(("replace", tmp))
    before = {path for _, path in events[:renamed]}
    assert before == {tmp / "a.txt", tmp / "sub" / "b.bin", tmp / "sub", tmp}
    assert events[renamed + 1 :] == [("fsync", tmp_path.resolve())]
    assert (tmp_path / "out" / "sub" / "b.bin").read_bytes() == b"b"


@pytest.mark.parametrize("overwrite", [False, True])
def test_disk_full_is_one_line_naming_the_destination_and_leaves_nothing_half_written(tmp_path, monkeypatch, overwrite):
    destination = tmp_path / "checkpoints" / "step_00000010"
    if overwrite:
        with atomic_directory(destination) as tmp:
            (tmp / "old.txt").write_text("kept")

    def disk_full(self, data, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError) as failure, atomic_directory(destination, overwrite=overwrite) as tmp:
        (tmp / "state.json").write_text("{}")
    assert str(failure.value) == f"cannot write {destination}: No space left on device"
    assert failure.value.errno == errno.ENOSPC
    assert os.listdir(destination.parent) == (["step_00000010"] if overwrite else [])
    if overwrite:
        assert os.listdir(destination) == ["old.txt"]


def refused(destination: Path, reason: str):
    """Expect the one-line OSError of a failed write to ``destination``."""
    return pytest.raises(OSError, match=f"^{re.escape(f'cannot write {destination}: {reason}')}$")


def test_library_writers_that_hide_the_os_error_are_recognised(tmp_path, monkeypatch):
    # safetensors reports a full disk as a SafetensorError whose text carries the OS error.
    with refused(tmp_path / "out", "No space left on device"), atomic_directory(tmp_path / "out"):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    # torch.save reports it as a RuntimeError about stream positions: the file system has no space left.
    full = os.statvfs_result((4096, 4096, 100, 0, 0, 100, 0, 0, 0, 255))
    monkeypatch.setattr(os, "statvfs", lambda path: full)
    with refused(tmp_path / "out", "No space left on device"), atomic_directory(tmp_path / "out"):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert os.listdir(tmp_path) == []


def test_errors_that_are_not_about_the_disk_pass_through(tmp_path):
    with pytest.raises(KeyError, match="bug"), atomic_directory(tmp_path / "out"):
        raise KeyError("bug")
    with pytest.raises(FileNotFoundError, match="input.txt"), atomic_directory(tmp_path / "out"):
        (tmp_path / "input.txt").read_text()
    assert os.listdir(tmp_path) == []


def test_a_failing_flush_or_read_only_parent_names_the_destination(tmp_path, monkeypatch):
    def io_error(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", io_error)
        with refused(tmp_path / "out", "Input/output error"), atomic_directory(tmp_path / "out") as tmp:
            write_two_files(tmp)
    assert os.listdir(tmp_path) == []

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    with monkeypatch.context() as patch:
        patch.setattr(Path, "mkdir", read_only)
        with refused(tmp_path / "run" / "out", "Read-only file system"), atomic_directory(tmp_path / "run" / "out"):
            pass


def test_a_file_where_a_folder_should_be_is_named(tmp_path):
    (tmp_path / "run").write_text("not a folder")
    for destination in (tmp_path / "run" / "step_1", tmp_path / "run" / "checkpoints" / "step_1"):
        with refused(destination, f"{tmp_path / 'run'} is not a folder"), atomic_directory(destination):
            pass
    assert (tmp_path / "run").read_text() == "not a folder"


def test_a_file_is_flushed_before_the_rename_and_its_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(
        os, "fsync", lambda fd: events.append(Path(os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd)
    )
    monkeypatch.setattr(os, "replace", lambda src, dst: events.append("replace") or real_replace(src, dst))
    atomic_write_bytes(tmp_path / "figure.png", b"\x89PNG\x00")
    temporary = events[0]
    assert temporary.parent == tmp_path.resolve() and temporary.name.startswith(".tmp-figure.png@")
    assert events == [temporary, "replace", tmp_path.resolve()]
    assert (tmp_path / "figure.png").read_bytes() == b"\x89PNG\x00"
    atomic_write_text(tmp_path / "report.md", "µP")
    assert (tmp_path / "report.md").read_bytes() == "µP".encode()  # UTF-8 whatever the locale


def test_a_failed_file_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    destination = tmp_path / "report.json"
    atomic_write_text(destination, "previous")

    def io_error(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", io_error)
    with refused(destination, "Input/output error"):
        atomic_write_bytes(destination, b"new")
    assert destination.read_text() == "previous" and os.listdir(tmp_path) == ["report.json"]


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)


def test_only_temporaries_of_dead_writers_on_this_machine_are_removed(tmp_path):
    host = socket.gethostname()
    dead = tmp_path / f".tmp-step_00000010@{host}-{dead_pid()}-0123abcd"
    alive = tmp_path / f".tmp-step_00000020@{host}-{os.getpid()}-0123abcd"
    other_host = tmp_path / f".tmp-step_00000030@another-machine-{dead_pid()}-0123abcd"
    not_ours = tmp_path / ".tmp-notes"
    for folder in (dead, alive, other_host, not_ours):
        folder.mkdir()
        (folder / "file").write_text("x")
    a_file = tmp_path / f".tmp-data@{host}-{dead_pid()}-0123abcd"
    a_file.write_text("a file, not a temporary folder")
    assert remove_stale_temporaries(tmp_path) == [dead]
    assert sorted(tmp_path.iterdir()) == sorted([alive, other_host, not_ours, a_file])
    assert remove_stale_temporaries(tmp_path / "missing") == []


def test_a_writer_killed_mid_write_leaves_a_temporary_the_next_start_removes(tmp_path):
    killed = "import os, sys; from lrm_train.utils import atomic_directory\n"
    killed += "with atomic_directory(sys.argv[1]) as tmp:\n    (tmp / 'half').write_text('x'); os._exit(9)"
    assert subprocess.run([sys.executable, "-c", killed, str(tmp_path / "out")]).returncode == 9
    (leftover,) = tmp_path.iterdir()
    assert leftover.name.startswith(".tmp-out@")
    assert remove_stale_temporaries(tmp_path) == [leftover]
    assert list(tmp_path.iterdir()) == []


def test_a_line_reaches_stderr_in_one_write_so_ranks_sharing_the_stream_cannot_interleave_it(monkeypatch):
    # Unbuffered stderr passes each write() straight to the OS: print() would issue the text and the newline as two.
    writes = []
    monkeypatch.setattr(sys, "stderr", type("Recorder", (), {"write": lambda self, text: writes.append(text)})())
    stderr_line("error: one")
    assert writes == ["error: one\n"]


def test_what_a_folder_holds_gets_the_usual_permissions_even_from_a_writer_that_restricts_them(tmp_path):
    from safetensors.torch import save_file

    umask = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "checkpoint") as tmp:
            save_file({"w": torch.zeros(2)}, tmp / "model.safetensors")  # safetensors writes 0600
            (tmp / "sub").mkdir(mode=0o700)
            (tmp / "sub" / "state.json").write_text("{}")
    finally:
        os.umask(umask)
    modes = {
        p.name: oct(p.stat().st_mode & 0o777) for p in [tmp_path / "checkpoint", *(tmp_path / "checkpoint").rglob("*")]
    }
    assert modes == {"checkpoint": "0o755", "model.safetensors": "0o644", "sub": "0o755", "state.json": "0o644"}
