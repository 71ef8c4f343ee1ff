"""``python -m lrm_train.data.prepare [data=...] [data.key=value ...]``: a corpus -> token shards + manifest.

The output folder ``{out_root}/{name}-{key}`` holds ``tokenizer.json``, ``train_NNNNN.bin`` / ``val_NNNNN.bin``
(raw uint16/uint32 token ids, each document followed by EOS), ``manifest.json`` and ``verified.json`` (see
``verify.py``). ``key`` hashes the settings and the source's fingerprint: the same config reuses a finished folder, a
changed one writes a new folder. A folder is written under a temporary name and renamed when complete, so an
interrupted run leaves nothing that looks finished; the next prepare removes the temporaries of dead ones. The
tokenizer workers die with the process, however it ends.

The corpus is streamed (``sources.py``): memory stays bounded however large it is. A document's split is a hash of
its key (file and record), so it does not depend on the rest of the corpus: with ``data.num_parts=N``, part ``i``
(``data.part=i``) tokenizes the i-th slice of the source's files into ``{out}.parts/``, and the same command without
``data.part`` concatenates the parts into a folder byte-identical to a one-process prepare. The parts share one
tokenizer, trained once beforehand (``--tokenizer-only``) or given (``data.tokenizer``): a part never trains one, so
parts running at once can never disagree about it.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import logging
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from lrm_train.cli import Interrupted, run_command
from lrm_train.config_compose import compose_schema, help_text
from lrm_train.data.config import FORMAT, MANIFEST, DataConfig
from lrm_train.data.loader import TokenData
from lrm_train.data.mixture import check_same_tokenizer
from lrm_train.data.sources import Corpus, SourceFile, load_corpus, source_fingerprint
from lrm_train.data.tokenizer import (
    available_cores,
    batch_encoder,
    eos_id,
    load_tokenizer,
    tokenizer_hash,
    train_bpe,
)
from lrm_train.data.verify import check_folder, write_stamps
from lrm_train.utils import atomic_directory, atomic_write_text, remove_stale_temporaries

log = logging.getLogger(__name__)

# Characters of text per task sent to a tokenizer worker: tens of milliseconds of work, so the workers share a few
# long documents evenly and many short ones cost little in messages.
_BATCH_CHARS = 1 << 16
_LOG_SECONDS = 60  # off a terminal, a progress line this often
SPLITS = ("train", "val")
PART_MANIFEST = "part.json"

# The settings that change the output (the read-side ones, num_proc and the parts do not).
OUTPUT_FIELDS = (
    "source",
    "hf_config",
    "hf_split",
    "text_field",
    "tokenizer",
    "vocab_size",
    "token_dtype",
    "val_fraction",
    "split_seed",
    "shard_tokens",
    "tokenizer_sample_bytes",
)


def token_dtype(cfg: DataConfig, vocab_size: int, source: str) -> np.dtype:
    fits_uint16 = vocab_size <= np.iinfo(np.uint16).max + 1
    if cfg.token_dtype == "auto":
        return np.dtype(np.uint16 if fits_uint16 else np.uint32)
    if cfg.token_dtype == "uint16" and not fits_uint16:
        raise ValueError(f"data.token_dtype=uint16 cannot hold the {vocab_size}-token vocabulary of {source}")
    return np.dtype(cfg.token_dtype)


def is_validation(key: str, val_fraction: float, seed: int) -> bool:
    """Whether the document ``key`` is held out: a hash of (seed, key), so each document is decided alone, the same
    way in every part. (If no document at all is held out, the corpus's last one is: see ``_fallback``.)"""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < val_fraction * 2**64


def output_key(cfg: DataConfig, fingerprint: str, tokenizer: Tokenizer | None) -> str:
    settings = {name: getattr(cfg, name) for name in OUTPUT_FIELDS}
    if tokenizer is not None:  # the given tokenizer's content, not its path
        settings["tokenizer"] = tokenizer_hash(tokenizer)
    payload = json.dumps({"settings": settings, "source": fingerprint, "format": FORMAT}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def part_files(files: list[SourceFile], num_parts: int, part: int) -> list[SourceFile]:
    """The ``part``-th of ``num_parts`` contiguous slices of ``files``, cut at equal shares of their bytes (a file
    belongs to the slice where it starts). Concatenated in order, the slices are the whole list."""
    total, start, chosen = max(1, sum(f.size for f in files)), 0, []
    for f in files:
        if min(num_parts - 1, start * num_parts // total) == part:
            chosen.append(f)
        start += f.size
    return chosen


@dataclass
class _ShardWriter:
    """Appends token arrays to ``{prefix}_NNNNN.bin`` files of at most ``shard_tokens`` tokens each."""

    folder: Path
    prefix: str
    shard_tokens: int
    shards: list[dict] = field(default_factory=list)
    _file = None
    _hash = None
    _count = 0

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._file is None or self._count == self.shard_tokens:
                self._open()
            take = tokens[: self.shard_tokens - self._count]
            data = take.tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._count += len(take)
            tokens = tokens[len(take) :]

    def _open(self) -> None:
        self.close()
        name = f"{self.prefix}_{len(self.shards):05d}.bin"
        # Open across write() calls, closed by close() or, on failure, with the temporary folder's removal.
        self._file, self._hash, self._count = open(self.folder / name, "wb"), hashlib.sha256(), 0  # noqa: SIM115
        self.shards.append({"file": name})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self.shards[-1].update(tokens=self._count, sha256=self._hash.hexdigest())
            self._file = None


def _train_texts(corpus: Corpus, cfg: DataConfig, files: list[SourceFile] | None = None) -> Iterator[str]:
    for key, text in corpus.documents(files):
        if not is_validation(key, cfg.val_fraction, cfg.split_seed):
            yield text


def tokenizer_sample(corpus: Corpus, cfg: DataConfig) -> Iterator[str]:
    """The training documents a BPE learns from: all of them when the source is at most
    ``data.tokenizer_sample_bytes``, else about that many bytes spread over every file: each file is allotted bytes
    in proportion to its size (the remainder carried to the next file), and gives whole documents from its start
    while the sample is behind its allotment. Only those documents are read. (A hub dataset: its first documents.)"""
    budget = cfg.tokenizer_sample_bytes
    if corpus.hub is not None or corpus.total_bytes <= budget:
        taken = 0
        for text in _train_texts(corpus, cfg):
            yield text
            taken += len(text.encode())
            if taken >= budget:
                return
        return
    rate, allotted, taken = budget / corpus.total_bytes, 0.0, 0
    for source_file in corpus.files:
        allotted += source_file.size * rate
        for text in _train_texts(corpus, cfg, [source_file]):
            if taken >= allotted:
                break
            yield text
            taken += len(text.encode())


def _train_tokenizer(corpus: Corpus, cfg: DataConfig) -> Tokenizer:
    started = time.perf_counter()
    tokenizer = train_bpe(tokenizer_sample(corpus, cfg), cfg.vocab_size)
    log.info("trained a %d-token BPE in %.1fs", tokenizer.get_vocab_size(), time.perf_counter() - started)
    return tokenizer


def _tokenize(
    cfg: DataConfig, corpus: Corpus, files: list[SourceFile] | None, tokenizer: Tokenizer, folder: Path
) -> dict:
    """Tokenize the documents of ``files`` (None: the whole corpus) into ``folder``'s shards, each document followed
    by EOS and written to its split in order; return what a part manifest records."""
    started = time.perf_counter()
    source = cfg.tokenizer or "the trained tokenizer"
    dtype, eos = token_dtype(cfg, tokenizer.get_vocab_size(), source), eos_id(tokenizer, source)
    num_proc = cfg.num_proc or available_cores()
    corpus.invalid_utf8.clear()  # this pass's files only (a part's record)
    writers = {split: _ShardWriter(folder, split, cfg.shard_tokens) for split in SPLITS}
    counts = {split: {"documents": 0, "last_document_tokens": 0} for split in SPLITS}
    end_of_document = np.array([eos], dtype=dtype)
    batch_splits: collections.deque[list[str]] = collections.deque()  # the split of each text of each batch sent

    def batches() -> Iterator[list[str]]:
        texts, splits, chars = [], [], 0
        for key, text in corpus.documents(files):
            texts.append(text)
            splits.append("val" if is_validation(key, cfg.val_fraction, cfg.split_seed) else "train")
            chars += len(text)
            if chars >= _BATCH_CHARS:
                batch_splits.append(splits)
                yield texts
                texts, splits, chars = [], [], 0
        if texts:
            batch_splits.append(splits)
            yield texts

    texts = batches()
    first = next(texts, None)
    # No document (a corpus refused below): no workers either. A pool closed while its workers still start up can
    # hang in Pool.terminate.
    num_proc = num_proc if first is not None else 1
    texts = itertools.chain([first] if first is not None else [], texts)
    with (
        batch_encoder(tokenizer, dtype, num_proc) as encode,
        tqdm(
            desc=f"tokenize (num_proc={num_proc})",
            unit="doc",
            disable=not sys.stderr.isatty(),  # a log file gets plain lines instead of a bar redrawn with \r
        ) as progress,
    ):
        last_line, done = started, 0
        for documents in encode(texts):
            splits = batch_splits.popleft()
            for split in SPLITS:
                ids = [tokens for tokens, where in zip(documents, splits) if where == split]
                if ids:
                    writers[split].write(np.concatenate([part for tokens in ids for part in (tokens, end_of_document)]))
                    counts[split]["documents"] += len(ids)
                    counts[split]["last_document_tokens"] = len(ids[-1]) + 1
            progress.update(len(documents))
            done += len(documents)
            if progress.disable and time.perf_counter() - last_line > _LOG_SECONDS:
                last_line = time.perf_counter()
                log.info("tokenized %d documents", done)
    splits = {}
    for split, writer in writers.items():
        writer.close()
        splits[split] = {**counts[split], "tokens": sum(s["tokens"] for s in writer.shards), "shards": writer.shards}
    return {
        "tokenizer_sha256": tokenizer_hash(tokenizer),
        "dtype": dtype.name,
        "splits": splits,
        "invalid_utf8": dict(corpus.invalid_utf8),
        "tokenize_seconds": round(time.perf_counter() - started, 3),
    }


def _fallback(parts: list[dict], source: str) -> tuple[str, str] | None:
    """(from, to) when one split came out empty: the corpus's last document moves there from the other split, so each
    holds at least one (it ends the other split's stream, so the move cuts a tail). None when both have documents."""
    documents = {split: sum(p["splits"][split]["documents"] for p in parts) for split in SPLITS}
    if sum(documents.values()) < 2:
        raise ValueError(
            f"data.source={source!r}: the corpus has {sum(documents.values())} non-empty documents; "
            "at least 2 are needed (one for validation)"
        )
    if not documents["val"]:
        return "train", "val"
    if not documents["train"]:
        return "val", "train"
    return None


def _cut_tail(arrays: list[np.ndarray], count: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    head, tail = list(arrays), []
    while count:
        last = head.pop()
        if len(last) > count:
            head.append(last[:-count])
            last = last[-count:]
        tail.insert(0, last)
        count -= len(last)
    return head, tail


def _merge(parts: list[tuple[Path, dict]], dest: Path, cfg: DataConfig) -> dict:
    """The parts' token streams, concatenated split by split (and ``_fallback`` applied), rewritten as ``dest``'s
    shards of ``data.shard_tokens``: exactly what one process writes for the whole source. Reads shard by shard."""
    infos = [info for _, info in parts]
    dtype = np.dtype(infos[0]["dtype"])
    streams, documents = {}, {}
    for split in SPLITS:
        streams[split] = [
            np.memmap(folder / shard["file"], dtype=dtype, mode="r")
            for folder, info in parts
            for shard in info["splits"][split]["shards"]
            if shard["tokens"]
        ]
        documents[split] = sum(info["splits"][split]["documents"] for info in infos)
    if move := _fallback(infos, cfg.source):
        source, target = move
        last = next(info for info in reversed(infos) if info["splits"][source]["documents"])
        streams[source], streams[target] = _cut_tail(streams[source], last["splits"][source]["last_document_tokens"])
        documents[source], documents[target] = documents[source] - 1, 1
    splits = {}
    for split in SPLITS:
        writer = _ShardWriter(dest, split, cfg.shard_tokens)
        for tokens in streams[split]:
            writer.write(tokens)
        writer.close()
        tokens = sum(s["tokens"] for s in writer.shards)
        splits[split] = {"documents": documents[split], "tokens": tokens, "shards": writer.shards}
    return splits


def _final_splits(info: dict) -> dict:
    return {
        split: {key: value for key, value in spec.items() if key != "last_document_tokens"}
        for split, spec in info["splits"].items()
    }


def _write_manifest(
    folder: Path, out: Path, cfg: DataConfig, corpus: Corpus, tokenizer: Tokenizer, splits: dict, infos: list[dict]
) -> None:
    manifest = {
        "format": FORMAT,
        "source": corpus.description,
        "settings": {name: getattr(cfg, name) for name in OUTPUT_FIELDS},
        "tokenizer": {
            "file": "tokenizer.json",
            "sha256": tokenizer_hash(tokenizer),
            "vocab_size": tokenizer.get_vocab_size(),
            "eos_id": eos_id(tokenizer, cfg.tokenizer or "the trained tokenizer"),
        },
        "dtype": infos[0]["dtype"],
        "splits": splits,
        "invalid_utf8": {name: count for info in infos for name, count in info["invalid_utf8"].items()},
        "tokenize_seconds": round(sum(info["tokenize_seconds"] for info in infos), 3),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    # The shards were hashed as they were written: stamp them verified (verify.py), so no reader hashes them again.
    write_stamps(folder, manifest)
    total = splits["train"]["tokens"] + splits["val"]["tokens"]
    seconds = max(manifest["tokenize_seconds"], 1e-9)
    log.info("wrote %s: %d tokens (%.0f tokens/s tokenizing)", out, total, total / seconds)


def prepared_folder(cfg: DataConfig, tokenizer: Tokenizer | None = None) -> Path | None:
    """Where ``cfg``'s prepared folder goes, found without reading the corpus; None for a hub dataset."""
    fingerprint = source_fingerprint(cfg)
    if fingerprint is None:
        return None
    if tokenizer is None and cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer)
    return Path(cfg.out_root) / f"{cfg.name}-{output_key(cfg, fingerprint, tokenizer)}"


def prepare(cfg: DataConfig, tokenizer_only: bool = False) -> Path:
    """Prepare ``cfg``'s corpus (or reuse the finished folder for the same settings); return the folder. With
    ``data.num_parts`` > 1: prepare ``data.part`` alone and return its folder, or without ``data.part`` every missing
    part, then merge them. ``tokenizer_only``: train (or find) the parts' shared tokenizer and return its path."""
    if (cfg.num_parts > 1 or tokenizer_only) and cfg.source.startswith("hf:"):
        raise ValueError(
            f"data.num_parts={cfg.num_parts}: a hub dataset ({cfg.source}) is prepared in one process "
            "(save its files locally and point data.source at them to prepare in parts)"
        )
    for leftover in remove_stale_temporaries(cfg.out_root):
        log.info("removed %s, left by an interrupted prepare", leftover)
    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    corpus = None if (out := prepared_folder(cfg, tokenizer)) else load_corpus(cfg)
    out = out or Path(cfg.out_root) / f"{cfg.name}-{output_key(cfg, corpus.fingerprint, tokenizer)}"
    if (out / MANIFEST).exists():
        log.info("reusing %s", out)
        return out / "tokenizer.json" if tokenizer_only else out
    corpus = corpus or load_corpus(cfg)
    if cfg.num_parts > 1 or tokenizer_only:
        return _prepare_in_parts(cfg, corpus, tokenizer, out, tokenizer_only)
    tokenizer = tokenizer or _train_tokenizer(corpus, cfg)
    with atomic_directory(out, overwrite=True) as tmp:
        tokenizer.save(str(tmp / "tokenizer.json"))
        info = _tokenize(cfg, corpus, None, tokenizer, tmp)
        if _fallback([info], cfg.source) is None:
            splits = _final_splits(info)
        else:  # a split came out empty (a tiny corpus): rewrite the streams with the last document moved
            whole = tmp / ".whole"
            whole.mkdir()
            for spec in info["splits"].values():
                for shard in spec["shards"]:
                    (tmp / shard["file"]).rename(whole / shard["file"])
            splits = _merge([(whole, info)], tmp, cfg)
            shutil.rmtree(whole)
        _write_manifest(tmp, out, cfg, corpus, tokenizer, splits, [info])
    return out


def _prepare_in_parts(
    cfg: DataConfig, corpus: Corpus, tokenizer: Tokenizer | None, out: Path, tokenizer_only: bool
) -> Path:
    parts_dir = out.with_name(out.name + ".parts")
    for leftover in remove_stale_temporaries(parts_dir):
        log.info("removed %s, left by an interrupted prepare", leftover)
    shared = parts_dir / "tokenizer.json"
    if tokenizer is None and shared.is_file():
        tokenizer = load_tokenizer(shared)
    elif tokenizer is None and cfg.part is not None:
        raise ValueError(
            f"data.part={cfg.part}: the parts' shared tokenizer {shared} does not exist yet: train it once first, "
            "with this command and --tokenizer-only in place of data.part (or give data.tokenizer)"
        )
    elif tokenizer is None:
        tokenizer = _train_tokenizer(corpus, cfg)
    if not shared.is_file():
        atomic_write_text(shared, tokenizer.to_str(pretty=True))  # complete or absent, as the parts read it
    if tokenizer_only:
        return shared
    folders = [parts_dir / f"part-{i:05d}-of-{cfg.num_parts:05d}" for i in range(cfg.num_parts)]
    for i in [cfg.part] if cfg.part is not None else range(cfg.num_parts):
        if not (folders[i] / PART_MANIFEST).is_file():
            with atomic_directory(folders[i], overwrite=True) as tmp:
                info = _tokenize(cfg, corpus, part_files(corpus.files, cfg.num_parts, i), tokenizer, tmp)
                (tmp / PART_MANIFEST).write_text(json.dumps(info, indent=2))
            log.info("wrote part %d of %d: %s", i, cfg.num_parts, folders[i])
    if cfg.part is not None:
        return folders[cfg.part]
    parts = [(folder, json.loads((folder / PART_MANIFEST).read_text())) for folder in folders]
    expected = tokenizer_hash(tokenizer)
    if stale := next((folder for folder, info in parts if info["tokenizer_sha256"] != expected), None):
        raise ValueError(f"{stale} was tokenized with another tokenizer than {shared}: remove it and prepare it again")
    with atomic_directory(out, overwrite=True) as tmp:
        tokenizer.save(str(tmp / "tokenizer.json"))
        splits = _merge(parts, tmp, cfg)
        _write_manifest(tmp, out, cfg, corpus, tokenizer, splits, [info for _, info in parts])
    shutil.rmtree(parts_dir)  # this prepare's own intermediate files, copied into the finished folder
    return out


def prepare_mixture(cfg: DataConfig) -> list[Path]:
    """``data.mixture``'s folders, in its order, as a run of it finds them: a ``source`` prepared like ``data.source``
    with the mixture's one tokenizer (``data.tokenizer``, else the first entry's), a ``path`` checked
    (``verify.check_folder``); a folder with another tokenizer is refused by name."""
    folders, tokenizer = {}, cfg.tokenizer
    for entry in cfg.mixture:
        if entry.path is not None:
            check_folder(entry.path, cfg.verify_checksums)
            folder = Path(entry.path)
        else:
            folder = prepare(cfg.source_config(entry, tokenizer))
        folders[entry.name] = TokenData(folder)
        tokenizer = tokenizer or str(folders[entry.name].tokenizer_path)
    check_same_tokenizer(folders)
    return [data.folder for data in folders.values()]


USAGE = """usage: python -m lrm_train.data.prepare [data=<option>] [data.<key>=<value> ...] [--tokenizer-only]

Prepares a corpus for training: trains a byte-level BPE tokenizer on a sample of its training split (or loads
data.tokenizer), tokenizes every document in data.num_proc processes and writes token shards, tokenizer.json and
manifest.json into {data.out_root}/{data.name}-{key}/, then prints that folder. The same settings reuse the finished
folder; the trainer runs the same step itself (on one node, or for a small source), so this is only needed to
prepare ahead of time.

A large corpus, in parts (e.g. a Slurm array, launch/prepare_array.sbatch), with the same data settings each time:
  ... data.num_parts=N --tokenizer-only    train the shared tokenizer once
  ... data.num_parts=N data.part=I         tokenize the I-th slice of the source's files (I = 0 .. N-1)
  ... data.num_parts=N                     merge the parts (preparing any missing) into the finished folder

With data.mixture=[{source: ...}, {path: ...}, ...]: prepares each entry's source as a run of the mixture does (with
data.tokenizer, else the first entry's tokenizer) and checks each prepared folder given by path; prints their
folders, one a line, in the mixture's order.
"""


@dataclass
class PrepareConfig:
    data: DataConfig = field(default_factory=DataConfig)


def compose(overrides: list[str]) -> DataConfig:
    """The data config of ``configs/prepare.yaml`` with Hydra ``overrides``; a ValueError line for any config error."""
    # A group of the trainer's (optim=muon): Hydra's own line does not say that prepare has only the data group.
    if foreign := [
        arg for arg in overrides if "." not in arg.partition("=")[0] and arg[0] not in "+~" and arg[:5] != "data="
    ]:
        raise ValueError(f"{foreign[0]}: prepare takes data settings only (data=NAME, data.KEY=VALUE)")
    return compose_schema("prepare", PrepareConfig, overrides).data


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    return run_command(argv, help_text("prepare", USAGE), compose, _prepare, flags=("--tokenizer-only",))


def _prepare(cfg: DataConfig, flags: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if "--tokenizer-only" in flags and cfg.part is not None:
        raise ValueError("--tokenizer-only trains the tokenizer the parts share: leave data.part out")
    if "--tokenizer-only" in flags and cfg.mixture is not None:
        raise ValueError("--tokenizer-only trains the tokenizer of one source's parts: leave data.mixture out")
    previous_handler = signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM cleans up as Ctrl-C does
    try:
        if cfg.mixture is not None:
            print("\n".join(map(str, prepare_mixture(cfg))))
        else:
            print(prepare(cfg, tokenizer_only="--tokenizer-only" in flags))
    except KeyboardInterrupt:
        kept = f"nothing of this prepare was kept (finished folders in {cfg.out_root} are untouched)"
        raise Interrupted(f"interrupted; {kept}") from None
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


if __name__ == "__main__":
    sys.exit(main())
