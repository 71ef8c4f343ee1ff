"""Byte-level BPE tokenizers: train one with ``tokenizers``, or load an existing tokenizer.json."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
# Runs of non-space (or of space) characters longer than this are cut into pieces of this length before the
# byte-level split. BPE training rescans a whole "word" for every merge, so a single 5 MB word without whitespace
# (minified code, base64, a DNA string) took hours; no useful token is this long, and shorter runs are untouched.
MAX_RUN_CHARS = 64
# MAX_RUN_CHARS characters that more of the same kind follow: cut off as a pre-token of their own.
_LONG_RUN_PIECE = rf"\S{{{MAX_RUN_CHARS}}}(?=\S)|\s{{{MAX_RUN_CHARS}}}(?=\s)"
# How other tokenizers name their end-of-document token, most common first.
EOS_CANDIDATES = (EOS, "<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


def train_bpe(texts: Iterable[str], vocab_size: int, length: int | None = None) -> Tokenizer:
    """Byte-level BPE (no unknown tokens, exact round trip) with PAD, BOS and EOS as ids 0, 1, 2."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LONG_RUN_PIECE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer, length=length)
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.tokenizer: {path} does not exist")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for malformed files
        raise ValueError(f"data.tokenizer: {path} is not a valid tokenizer.json ({e})") from None


def eos_id(tokenizer: Tokenizer, source: str) -> int:
    for token in EOS_CANDIDATES:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise ValueError(f"data.tokenizer: {source} has no end-of-document token (looked for {', '.join(EOS_CANDIDATES)})")


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
