"""Shards are hashed once: ``python -m lrm_train.data.verify FOLDER`` re-hashes them all on demand.

prepare hashes each shard as it writes it (the manifest's sha256) and records every shard's size and modification
time (``st_mtime_ns``) in ``verified.json``. Opening a folder (``check_folder``) then costs one ``stat`` per shard: a
shard whose size differs from the manifest is refused by name; one whose stamp matches is trusted; one whose stamp
is missing or changed (copied without its times, rewritten) is hashed once, and stamped again when it matches (with
``verify_checksums=False`` only the sizes are checked). A change that keeps both size and time (a bit flipped in
place by the disk, or a file written and its mtime restored) is only found by the full re-hash of this command.

In a distributed run rank 0 checks the folder; every rank then checks (by size) and maps only the shards it reads,
when it first reads them (``loader.TokenSplit``).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from lrm_train.data.config import MANIFEST
from lrm_train.data.loader import check_size, read_manifest
from lrm_train.utils import atomic_write_text, sha256_file

log = logging.getLogger(__name__)

STAMPS = "verified.json"


def _shards(manifest: dict) -> list[dict]:
    return [shard for split in manifest["splits"].values() for shard in split["shards"]]


def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def write_stamps(folder: Path, manifest: dict) -> None:
    """Record every shard of ``folder`` as verified as it is now."""
    stamps = {shard["file"]: _stamp(folder / shard["file"]) for shard in _shards(manifest)}
    atomic_write_text(folder / STAMPS, json.dumps({"shards": stamps}, indent=0))


def _itemsize(manifest: dict) -> int:
    return {"uint16": 2, "uint32": 4}[manifest["dtype"]]


def _read_stamps(folder: Path) -> dict:
    try:
        return json.loads((folder / STAMPS).read_text())["shards"]
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or unreadable: every shard is hashed once
        return {}


def _check_hash(path: Path, shard: dict) -> None:
    if sha256_file(path) != shard["sha256"]:
        raise ValueError(f"{path}: checksum does not match {MANIFEST} (the file is corrupt or was changed)")


def check_folder(folder: str | Path, verify_checksums: bool = True) -> None:
    """Check every shard of a prepared folder by size and stamp; hash only the unstamped ones (see the module's
    docstring). One error line naming the first bad shard."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    itemsize, stamps, hashed = _itemsize(manifest), _read_stamps(folder), False
    for shard in _shards(manifest):
        path = folder / shard["file"]
        check_size(path, shard, itemsize)
        if verify_checksums and stamps.get(shard["file"]) != _stamp(path):
            _check_hash(path, shard)
            hashed = True
    if hashed:
        try:
            write_stamps(folder, manifest)
        except OSError as e:  # a read-only copy: still correct, only hashed again at the next open
            log.warning("could not record the verified shards (%s): they will be hashed again at the next open", e)


def verify_all(folder: str | Path) -> int:
    """Re-hash every shard of ``folder`` against its manifest (and stamp them); return how many there are."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    itemsize, shards = _itemsize(manifest), _shards(manifest)
    for shard in shards:
        check_size(folder / shard["file"], shard, itemsize)
        _check_hash(folder / shard["file"], shard)
    write_stamps(folder, manifest)
    return len(shards)


USAGE = """usage: python -m lrm_train.data.verify FOLDER

Re-hashes every shard of a prepared folder against its manifest.json. Exit 0 and one line when all match; exit 1 and
one line naming the first corrupt, truncated or missing shard otherwise (2 for a missing or invalid folder)."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    folder = Path(argv[0])
    try:
        read_manifest(folder)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        count = verify_all(folder)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"ok: {count} shards of {folder} match {MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
