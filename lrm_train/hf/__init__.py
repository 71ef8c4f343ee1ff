"""Interop with Hugging Face transformers' FalconH1 (export with multipliers folded, import with any placement)."""

from lrm_train.hf.convert import config_from_hf, export_hf, hf_config, hf_state_dict, import_hf

__all__ = ["config_from_hf", "export_hf", "hf_config", "hf_state_dict", "import_hf"]
