"""DataConfig: where the corpus comes from, how it is tokenized and split, and how the loader reads it."""

from __future__ import annotations

from dataclasses import dataclass

TOKEN_DTYPES = ("auto", "uint16", "uint32")
# A prepared folder: its manifest file and the format it declares.
MANIFEST = "manifest.json"
FORMAT = "lrm_train.tokens/1"


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
    num_proc: int = 2
    # Read side.
    seq_len: int = 256
    val_windows: int = 64  # fixed validation windows of seq_len tokens (fewer if the split is shorter)
    verify_checksums: bool = True
    prefetch: int = 2

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("data.source is empty: set it to a file, a folder, shakespeare or hf:NAME")
        if self.token_dtype not in TOKEN_DTYPES:
            raise ValueError(f"data.token_dtype={self.token_dtype!r} is not one of {', '.join(TOKEN_DTYPES)}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        for name in ("vocab_size", "shard_tokens", "num_proc", "seq_len", "val_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name}={getattr(self, name)} must be positive")
