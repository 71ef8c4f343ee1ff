"""The tokenizer files an export carries, and a tokenizer.json given on a command line."""

from __future__ import annotations

import json
from pathlib import Path

from lrm_train.data.tokenizer import EOS_CANDIDATES, load_tokenizer


def tokenizer_argument(path: str | Path, key: str) -> Path:
    """A tokenizer.json a user passed as ``key``: one line naming the key when it is missing or a folder."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{key}={path}: a folder, not a tokenizer.json file")
    if not path.is_file():
        raise ValueError(f"{key}={path}: no such file")
    return path


def hf_tokenizer_files(tokenizer_json: str | Path) -> dict[str, str]:
    """``tokenizer.json`` and a ``tokenizer_config.json`` with which ``AutoTokenizer`` loads it as a fast tokenizer
    whose end-of-document token is ours (no BOS: like our training data, documents are only followed by EOS)."""
    tokenizer = load_tokenizer(tokenizer_json)
    eos = next((t for t in EOS_CANDIDATES if tokenizer.token_to_id(t) is not None), None)
    if eos is None:
        raise ValueError(f"{tokenizer_json}: no end-of-document token (looked for {', '.join(EOS_CANDIDATES)})")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": eos}
    return {"tokenizer.json": Path(tokenizer_json).read_text(), "tokenizer_config.json": json.dumps(config, indent=2)}
