"""Interop with Hugging Face transformers (export with multipliers folded, import with any placement)."""

from lrm_train.hf.convert import export_hf
from lrm_train.models.hf_folder import import_hf

__all__ = ["export_hf", "import_hf"]
