"""Shards are hashed once (as prepare writes them), then checked on open by size and a stamp; a full re-hash on demand
(``python -m lrm_train.data.verify``) finds what keeps both."""

import json
import os
import subprocess
import sys

import pytest

from lrm_train.data import verify
from lrm_train.data.verify import STAMPS, check_folder


@pytest.fixture
def hashes(monkeypatch):
    """The shards hashed by verify.py, by name."""
    hashed = []
    real = verify.sha256_file

    def counted(path):
        hashed.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(verify, "sha256_file", counted)
    return hashed


def flip_a_byte_keeping_size_and_time(shard):
    stat = shard.stat()
    data = bytearray(shard.read_bytes())
    data[3] ^= 0xFF
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_fresh_folder_is_stamped_and_opening_it_hashes_nothing(prepared, hashes):
    stamps = json.loads((prepared / STAMPS).read_text())["shards"]
    assert set(stamps) == {p.name for p in prepared.glob("*.bin")}
    check_folder(prepared)
    check_folder(prepared)
    assert hashes == []


def test_a_shard_with_a_changed_stamp_is_hashed_once_then_trusted(prepared, hashes):
    shard = prepared / "train_00001.bin"
    os.utime(shard, ns=(0, 10**18))  # copied without its times, say
    check_folder(prepared)
    check_folder(prepared)
    assert hashes == ["train_00001.bin"]


def test_a_changed_shard_with_a_new_time_is_refused_on_open(prepared):
    shard = prepared / "train_00001.bin"
    data = bytearray(shard.read_bytes())
    data[3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="train_00001.bin: checksum does not match manifest.json"):
        check_folder(prepared)
    check_folder(prepared, verify_checksums=False)  # sizes only


def test_a_truncated_shard_is_refused_on_open_without_hashing(prepared, hashes):
    shard = prepared / "val_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ValueError, match=r"val_00000.bin: \d+ bytes, manifest.json says \d+"):
        check_folder(prepared)
    assert hashes == []
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="val_00000.bin: shard listed in manifest.json is missing"):
        check_folder(prepared, verify_checksums=False)


@pytest.mark.multiprocess
def test_verify_finds_a_corruption_that_keeps_size_and_time(prepared):
    run = [sys.executable, "-m", "lrm_train.data.verify", str(prepared)]
    done = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("ok: ") and not done.stderr
    shard = prepared / "train_00002.bin"
    flip_a_byte_keeping_size_and_time(shard)
    check_folder(prepared)  # size and stamp match: opening cannot tell
    done = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"error: {shard}: checksum does not match manifest.json (the file is corrupt or was changed)"
    ]


def test_verify_of_a_folder_that_is_not_prepared_is_one_line(tmp_path, capsys):
    assert verify.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {tmp_path / 'manifest.json'}: no such file (run python -m lrm_train.data.prepare first)"
    ]
