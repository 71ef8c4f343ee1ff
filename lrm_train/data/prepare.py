"""``python -m lrm_train.data.prepare [data=...] [data.key=value ...]``: a corpus -> token shards + manifest.

The output folder ``{out_root}/{name}-{key}`` holds ``tokenizer.json``, ``train_NNNNN.bin`` / ``val_NNNNN.bin``
(raw uint16/uint32 token ids, each document followed by EOS) and ``manifest.json``. ``key`` hashes the settings and
the source's fingerprint: the same config reuses a finished folder, a changed one writes a new folder. A folder is
written under a temporary name and renamed when complete, so an interrupted run leaves nothing that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from lrm_train.data.config import FORMAT, MANIFEST, DataConfig
from lrm_train.data.sources import Corpus, load_corpus
from lrm_train.data.tokenizer import eos_id, load_tokenizer, tokenizer_hash, train_bpe
from lrm_train.utils import atomic_directory

log = logging.getLogger(__name__)

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


def output_key(cfg: DataConfig, corpus: Corpus, tokenizer: Tokenizer | None) -> str:
    settings = {name: getattr(cfg, name) for name in _OUTPUT_FIELDS}
    if tokenizer is not None:  # the given tokenizer's content, not its path
        settings["tokenizer"] = tokenizer_hash(tokenizer)
    payload = json.dumps({"settings": settings, "source": corpus.fingerprint, "format": FORMAT}, sort_keys=True)
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
        self._file, self._hash, self._count = open(self.folder / name, "wb"), hashlib.sha256(), 0
        self.shards.append({"file": name})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self.shards[-1].update(tokens=self._count, sha256=self._hash.hexdigest())
            self._file = None


def _tokenize(corpus: Corpus, tokenizer: Tokenizer, num_proc: int):
    def encode(batch):
        return {"ids": [e.ids for e in tokenizer.encode_batch(batch["text"])]}

    return corpus.documents.map(
        encode,
        batched=True,
        batch_size=64,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=["text"],
        desc="tokenize",
    )


def prepare(cfg: DataConfig) -> Path:
    """Prepare ``cfg``'s corpus (or reuse the finished folder for the same settings); return the folder."""
    corpus = load_corpus(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    out = Path(cfg.out_root) / f"{cfg.name}-{output_key(cfg, corpus, tokenizer)}"
    if (out / MANIFEST).exists():
        log.info("reusing %s", out)
        return out
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
    tokenized = _tokenize(corpus, tokenizer, cfg.num_proc)
    with atomic_directory(out, overwrite=True) as tmp:
        tokenizer.save(str(tmp / "tokenizer.json"))
        splits = {}
        for split, indices in (("train", train_idx), ("val", val_idx)):
            writer = _ShardWriter(tmp, split, cfg.shard_tokens)
            for batch in tokenized.select(indices).iter(batch_size=256):
                ends = np.cumsum([len(ids) + 1 for ids in batch["ids"]])
                flat = np.full(ends[-1], eos, dtype=dtype)
                mask = np.ones(ends[-1], dtype=bool)
                mask[ends - 1] = False
                flat[mask] = np.concatenate([np.asarray(ids, dtype=dtype) for ids in batch["ids"]])
                writer.write(flat)
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


def main() -> None:
    import hydra
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    @dataclass
    class PrepareConfig:
        data: DataConfig = field(default_factory=DataConfig)

    ConfigStore.instance().store(name="prepare_schema", node=PrepareConfig)

    @hydra.main(version_base=None, config_path=str(Path(__file__).parents[2] / "configs"), config_name="prepare")
    def run(cfg) -> None:
        try:
            out = prepare(OmegaConf.to_object(cfg).data)
        except (ValueError, FileNotFoundError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("error: prepare interrupted; no output was left behind", file=sys.stderr)
            sys.exit(130)
        print(out)

    run()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
