"""``python -m lrm_train.data.prepare [data=...] [data.key=value ...]``: a corpus -> token shards + manifest.

The output folder ``{out_root}/{name}-{key}`` holds ``tokenizer.json``, ``train_NNNNN.bin`` / ``val_NNNNN.bin``
(raw uint16/uint32 token ids, each document followed by EOS) and ``manifest.json``. ``key`` hashes the settings and
the source's fingerprint: the same config reuses a finished folder, a changed one writes a new folder. A folder is
written under a temporary name and renamed when complete, so an interrupted run leaves nothing that looks finished;
the next prepare removes the temporaries of dead ones. The tokenizer workers die with the process, however it ends.
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from lrm_train.cli import Interrupted, run_command
from lrm_train.config_compose import compose_schema, help_text
from lrm_train.data.config import FORMAT, MANIFEST, DataConfig
from lrm_train.data.sources import load_corpus, source_fingerprint
from lrm_train.data.tokenizer import batch_encoder, eos_id, load_tokenizer, tokenizer_hash, train_bpe
from lrm_train.utils import atomic_directory, remove_stale_temporaries

log = logging.getLogger(__name__)

# Characters of text per task sent to a tokenizer worker: tens of milliseconds of work, so the workers share a few
# long documents evenly and many short ones cost little in messages.
_BATCH_CHARS = 1 << 16
_LOG_SECONDS = 60  # off a terminal, a progress line this often

# The settings that change the output (the read-side ones do not).
_OUTPUT_FIELDS = (
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
)


def token_dtype(cfg: DataConfig, vocab_size: int, source: str) -> np.dtype:
    fits_uint16 = vocab_size <= np.iinfo(np.uint16).max + 1
    if cfg.token_dtype == "auto":
        return np.dtype(np.uint16 if fits_uint16 else np.uint32)
    if cfg.token_dtype == "uint16" and not fits_uint16:
        raise ValueError(f"data.token_dtype=uint16 cannot hold the {vocab_size}-token vocabulary of {source}")
    return np.dtype(cfg.token_dtype)


def split_documents(count: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint train/validation document indices (each sorted); at least one document on each side."""
    order = np.random.default_rng(seed).permutation(count)
    n_val = min(max(1, round(count * val_fraction)), count - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def output_key(cfg: DataConfig, fingerprint: str, tokenizer: Tokenizer | None) -> str:
    settings = {name: getattr(cfg, name) for name in _OUTPUT_FIELDS}
    if tokenizer is not None:  # the given tokenizer's content, not its path
        settings["tokenizer"] = tokenizer_hash(tokenizer)
    payload = json.dumps({"settings": settings, "source": fingerprint, "format": FORMAT}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


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


def _text_batches(documents: datasets.Dataset, max_chars: int) -> Iterator[list[str]]:
    """The texts in order, in batches of about ``max_chars`` characters (a longer document makes a batch alone)."""
    batch, chars = [], 0
    for rows in documents.iter(batch_size=256):
        for text in rows["text"]:
            batch.append(text)
            chars += len(text)
            if chars >= max_chars:
                yield batch
                batch, chars = [], 0
    if batch:
        yield batch


def prepare(cfg: DataConfig) -> Path:
    """Prepare ``cfg``'s corpus (or reuse the finished folder for the same settings); return the folder."""
    for leftover in remove_stale_temporaries(cfg.out_root):
        log.info("removed %s, left by an interrupted prepare", leftover)
    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    corpus = None if (fingerprint := source_fingerprint(cfg)) else load_corpus(cfg)
    out = Path(cfg.out_root) / f"{cfg.name}-{output_key(cfg, fingerprint or corpus.fingerprint, tokenizer)}"
    if (out / MANIFEST).exists():
        log.info("reusing %s", out)
        return out
    corpus = corpus or load_corpus(cfg)
    train_idx, val_idx = split_documents(len(corpus.documents), cfg.val_fraction, cfg.split_seed)
    if tokenizer is None:
        started = time.perf_counter()
        train_texts = corpus.documents.select(train_idx)
        tokenizer = train_bpe((row["text"] for row in train_texts), cfg.vocab_size, length=len(train_texts))
        log.info("trained a %d-token BPE in %.1fs", tokenizer.get_vocab_size(), time.perf_counter() - started)
    source = cfg.tokenizer or "the trained tokenizer"
    vocab = tokenizer.get_vocab_size()
    dtype, eos = token_dtype(cfg, vocab, source), eos_id(tokenizer, source)

    started = time.perf_counter()
    with (
        atomic_directory(out, overwrite=True) as tmp,
        batch_encoder(tokenizer, dtype, cfg.num_proc) as encode,
        tqdm(
            total=len(corpus.documents),
            desc=f"tokenize (num_proc={cfg.num_proc})",
            unit="doc",
            disable=not sys.stderr.isatty(),  # a log file gets plain lines instead of a bar redrawn with \r
        ) as progress,
    ):
        last_line = started
        tokenizer.save(str(tmp / "tokenizer.json"))
        splits = {}
        for split, indices in (("train", train_idx), ("val", val_idx)):
            writer, end_of_document = _ShardWriter(tmp, split, cfg.shard_tokens), np.array([eos], dtype=dtype)
            for documents in encode(_text_batches(corpus.documents.select(indices), _BATCH_CHARS)):
                writer.write(np.concatenate([part for ids in documents for part in (ids, end_of_document)]))
                progress.update(len(documents))
                if progress.disable and time.perf_counter() - last_line > _LOG_SECONDS:
                    last_line = time.perf_counter()
                    log.info("tokenized %d of %d documents", progress.n, progress.total)
            writer.close()
            tokens = sum(s["tokens"] for s in writer.shards)
            splits[split] = {"documents": len(indices), "tokens": tokens, "shards": writer.shards}
        seconds = time.perf_counter() - started
        manifest = {
            "format": FORMAT,
            "source": corpus.description,
            "settings": {name: getattr(cfg, name) for name in _OUTPUT_FIELDS},
            "tokenizer": {
                "file": "tokenizer.json",
                "sha256": tokenizer_hash(tokenizer),
                "vocab_size": vocab,
                "eos_id": eos,
            },
            "dtype": dtype.name,
            "splits": splits,
            "invalid_utf8": corpus.invalid_utf8,
            "tokenize_seconds": round(seconds, 3),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    total = splits["train"]["tokens"] + splits["val"]["tokens"]
    log.info("wrote %s: %d tokens (%.0f tokens/s)", out, total, total / max(seconds, 1e-9))
    return out


USAGE = """usage: python -m lrm_train.data.prepare [data=<option>] [data.<key>=<value> ...]

Prepares a corpus for training: trains a byte-level BPE tokenizer on its training split (or loads data.tokenizer),
tokenizes every document in data.num_proc processes and writes token shards, tokenizer.json and manifest.json into
{data.out_root}/{data.name}-{key}/, then prints that folder. The same settings reuse the finished folder; the trainer
runs the same step itself, so this is only needed to prepare ahead of time.
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
    return run_command(argv, help_text("prepare", USAGE), compose, _prepare)


def _prepare(cfg: DataConfig, _flags: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    previous_handler = signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM cleans up as Ctrl-C does
    try:
        print(prepare(cfg))
    except KeyboardInterrupt:
        kept = f"nothing of this prepare was kept (finished folders in {cfg.out_root} are untouched)"
        raise Interrupted(f"interrupted; {kept}") from None
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


if __name__ == "__main__":
    sys.exit(main())
