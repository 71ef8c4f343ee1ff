"""DataConfig: where the corpus comes from, how it is tokenized and split, and how the loader reads it."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import PurePath

TOKEN_DTYPES = ("auto", "uint16", "uint32")
# A prepared folder: its manifest file and the format it declares.
MANIFEST = "manifest.json"
FORMAT = "lrm_train.tokens/1"


# Mixtures (``data.mixture``): each entry a prepared folder (``path``) or a corpus prepared like ``data.source``.
_MIXTURE_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # names go into metric keys: data/share/<name>, val_loss/<name>
_PREPARED_SUFFIX = re.compile(r"-[0-9a-f]{16}$")  # the settings key prepare appends to a folder's name


@dataclass
class MixtureSource:
    """One entry of ``data.mixture``: ``path`` (a prepared folder) or ``source`` (as ``data.source``), its ``weight``
    (> 0; the weights are normalised) and a ``name`` for its metrics (default: the folder's or source's name)."""

    path: str | None = None
    source: str | None = None
    weight: float = 1.0
    name: str | None = None

    def check(self, key: str) -> None:
        """Raise one line naming ``key`` (``data.mixture[i]``) for a bad entry; derive the name when none is given."""
        if (self.path is None) == (self.source is None):
            raise ValueError(f"{key} needs exactly one of path (a prepared folder) or source (a corpus)")
        if not self.weight > 0:
            raise ValueError(f"{key}.weight={self.weight} must be > 0")
        if self.name is None:
            stem = PurePath(self.path or self.source.removeprefix("hf:").rstrip("/")).stem
            self.name = re.sub(r"[^A-Za-z0-9_.-]", "_", _PREPARED_SUFFIX.sub("", stem)) or "source"
        elif not _MIXTURE_NAME.fullmatch(self.name):
            raise ValueError(f"{key}.name={self.name!r}: use letters, digits, '_', '.' and '-' only")


@dataclass
class DataConfig:
    """One corpus, prepared once into ``{out_root}/{name}-{key}`` and read by the loader.

    source: ``shakespeare`` (38 public-domain plays that install with the project), a local file or folder
      (.txt/.md/.rst: one document per file; .jsonl/.json/.parquet/.arrow: one document per record), or
      ``hf:NAME`` for a ``datasets`` dataset by name (needs the hub; offline it fails at once).
    """

    name: str = "shakespeare"
    source: str = "shakespeare"
    hf_config: str | None = None  # hf: sources only
    hf_split: str = "train"  # hf: sources only
    text_field: str = "text"  # records' text column (jsonl/parquet/arrow/hf)
    out_root: str = "data"
    tokenizer: str | None = None  # an existing tokenizer.json; None trains a byte-level BPE on the train split
    vocab_size: int = 8192  # for a trained tokenizer (special tokens included)
    token_dtype: str = "auto"  # auto: uint16 when the vocabulary fits, else uint32
    val_fraction: float = 0.05  # share of documents held out (at least one)
    split_seed: int = 0
    shard_tokens: int = 1 << 24
    num_proc: int = 0  # tokenizer processes; 0: one per CPU core this process may use
    # Preparing at scale (see prepare.py): the trained tokenizer's sample, and preparing in parts.
    tokenizer_sample_bytes: int = 256 << 20  # text a trained BPE learns from, spread over the source's files
    num_parts: int = 1  # slices of the source's files, prepared apart (data.part) and merged into one folder
    part: int | None = None  # prepare only this slice (0 .. num_parts - 1); unset: every missing one, then merge
    # Read side.
    seq_len: int = 256
    val_windows: int = 64  # fixed validation windows of seq_len tokens (fewer if the split is shorter)
    verify_checksums: bool = True  # re-hash a shard whose verified stamp changed (false: sizes only); verify.py
    prefetch: int = 2
    # Several corpora sampled by weight, in place of data.source (see lrm_train/data/mixture.py); None: data.source.
    mixture: list[MixtureSource] | None = None

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("data.source is empty: set it to a file, a folder, shakespeare or hf:NAME")
        if self.token_dtype not in TOKEN_DTYPES:
            raise ValueError(f"data.token_dtype={self.token_dtype!r} is not one of {', '.join(TOKEN_DTYPES)}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        for name in ("vocab_size", "shard_tokens", "seq_len", "val_windows", "tokenizer_sample_bytes", "num_parts"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name}={getattr(self, name)} must be positive")
        if self.num_proc < 0:
            raise ValueError(f"data.num_proc={self.num_proc} must be 0 (one per core) or positive")
        if self.part is not None and not 0 <= self.part < self.num_parts:
            raise ValueError(
                f"data.part={self.part} must be in 0 .. {self.num_parts - 1} (data.num_parts={self.num_parts})"
            )
        if self.mixture is not None:
            self._check_mixture()

    def source_config(self, entry: MixtureSource, tokenizer: str | None) -> DataConfig:
        """The settings that prepare a mixture entry's ``source``: these, with its name and the mixture's one
        ``tokenizer``."""
        return replace(self, name=entry.name, source=entry.source, tokenizer=tokenizer, mixture=None)

    def _check_mixture(self) -> None:
        if not self.mixture:
            raise ValueError("data.mixture is empty: list its sources, or leave it out to train on data.source")
        if self.num_parts > 1 or self.part is not None:
            setting = f"data.part={self.part}" if self.part is not None else f"data.num_parts={self.num_parts}"
            raise ValueError(
                f"{setting} with data.mixture: prepare each source in parts with data.source=..., "
                "then list the folders in data.mixture"
            )
        for i, entry in enumerate(self.mixture):
            entry.check(f"data.mixture[{i}]")
        names = [entry.name for entry in self.mixture]
        if twice := next((name for name in names if names.count(name) > 1), None):
            raise ValueError(f"data.mixture: two sources are named {twice!r}; give them distinct names (name: ...)")
