"""The tokenizer files an export carries, and where a training run's tokenizer is."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from lrm_train.data import TokenData
from lrm_train.data.tokenizer import EOS_CANDIDATES, load_tokenizer


def run_data_folder(run_config_yaml: str) -> Path:
    """The prepared data folder of a training run (the one ``prepare`` made or reused for its data config)."""
    from lrm_train.data.config import DataConfig
    from lrm_train.data.prepare import load_corpus, output_key

    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.create(run_config_yaml).data))
    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    return Path(cfg.out_root) / f"{cfg.name}-{output_key(cfg, load_corpus(cfg), tokenizer)}"


def run_tokenizer_path(run_config_yaml: str, source: Path) -> Path:
    """The tokenizer.json of a training run (``source``: its checkpoint, named in the error)."""
    try:
        return TokenData(run_data_folder(run_config_yaml), verify_checksums=False).tokenizer_path
    except (OSError, ValueError) as e:
        raise ValueError(f"{source}: its run's data is not readable ({e}); pass the tokenizer's path") from None


def hf_tokenizer_files(tokenizer_json: str | Path) -> dict[str, str]:
    """``tokenizer.json`` and a ``tokenizer_config.json`` with which ``AutoTokenizer`` loads it as a fast tokenizer
    whose end-of-document token is ours (no BOS: like our training data, documents are only followed by EOS)."""
    tokenizer = load_tokenizer(tokenizer_json)
    eos = next((t for t in EOS_CANDIDATES if tokenizer.token_to_id(t) is not None), None)
    if eos is None:
        raise ValueError(f"{tokenizer_json}: no end-of-document token (looked for {', '.join(EOS_CANDIDATES)})")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": eos}
    return {"tokenizer.json": Path(tokenizer_json).read_text(), "tokenizer_config.json": json.dumps(config, indent=2)}
