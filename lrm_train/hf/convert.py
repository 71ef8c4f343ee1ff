"""Writing folders in Hugging Face's format (config.json + safetensors) for any model family of ``models.hf_mapping``.

What a family's config fields and tensors are called there is the family's mapping. Reading such folders is
``models.hf_folder``'s (the trainer's ``train.init_from`` reads them too, and it sits below this package).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from torch import nn

from lrm_train.hf.tokenizer import hf_tokenizer_files
from lrm_train.models.hf_folder import mapping_of_model
from lrm_train.models.io import write_weights_folder


def export_hf(
    model: nn.Module,
    out_dir: str | Path,
    overwrite: bool = False,
    sources: Iterable[str | Path] = (),
    tokenizer: str | Path | None = None,
) -> Path:
    """Write a folder that transformers' ``from_pretrained`` loads (and ``AutoTokenizer``, given ``tokenizer``: a
    tokenizer.json, carried along).

    ``overwrite`` replaces only a folder lrm_train wrote; ``sources`` (folders the model was read from) never.
    """
    tokenizer_files = hf_tokenizer_files(tokenizer) if tokenizer is not None else None
    mapping = mapping_of_model(model)
    config = {"architectures": [mapping.ARCHITECTURE], "model_type": mapping.MODEL_TYPE}
    config.update(mapping.to_hf_config(model.cfg))
    # transformers refuses safetensors files whose "format" is not a framework it knows.
    state = mapping.to_hf_state(model)
    return write_weights_folder(out_dir, config, state, {"format": "pt"}, overwrite, sources, tokenizer_files)
