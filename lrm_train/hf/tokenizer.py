"""The tokenizer files an export carries, and the tokenizer a training checkpoint was trained with."""

from __future__ import annotations

import json
from pathlib import Path

from lrm_train.data.tokenizer import EOS_CANDIDATES, load_tokenizer
from lrm_train.train.checkpoint import TOKENIZER
from lrm_train.utils import sha256_file


def tokenizer_argument(path: str | Path, key: str) -> Path:
    """A tokenizer.json a user passed as ``key``: one line naming the key when it is missing or a folder."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{key}={path}: a folder, not a tokenizer.json file")
    if not path.is_file():
        raise ValueError(f"{key}={path}: no such file")
    return path


def checkpoint_tokenizer(checkpoint: Path, run: dict, given: Path | None = None) -> Path:
    """The tokenizer.json ``checkpoint`` (its ``run`` section) was trained with: the copy the checkpoint carries.

    Never looked up from the corpus: a corpus changed since, or prepared again, gives another tokenizer, and a model
    paired with it decodes wrongly. ``given`` must be the same file (its sha256 is the one the run recorded); a
    checkpoint written before checkpoints carried their tokenizer has no record, so there ``given`` is required.
    """
    recorded = (run.get("data") or {}).get("tokenizer_sha256")
    if recorded is None:
        if given is None:
            raise ValueError(
                f"checkpoint {checkpoint}: written before checkpoints carried their tokenizer; "
                "pass the tokenizer.json it was trained with"
            )
        return given
    if given is not None and sha256_file(given) != recorded:
        raise ValueError(
            f"{given} is not the tokenizer checkpoint {checkpoint} was trained with "
            f"({checkpoint / TOKENIZER}, sha256 {recorded[:12]}...); refusing to pair them"
        )
    return checkpoint / TOKENIZER


def hf_tokenizer_files(tokenizer_json: str | Path) -> dict[str, str]:
    """``tokenizer.json`` and a ``tokenizer_config.json`` with which ``AutoTokenizer`` loads it as a fast tokenizer
    whose end-of-document token is ours (no BOS: like our training data, documents are only followed by EOS)."""
    tokenizer = load_tokenizer(tokenizer_json)
    eos = next((t for t in EOS_CANDIDATES if tokenizer.token_to_id(t) is not None), None)
    if eos is None:
        raise ValueError(f"{tokenizer_json}: no end-of-document token (looked for {', '.join(EOS_CANDIDATES)})")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": eos}
    return {"tokenizer.json": Path(tokenizer_json).read_text(), "tokenizer_config.json": json.dumps(config, indent=2)}
