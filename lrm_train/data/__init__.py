"""Data: corpus -> tokenizer + token shards + manifest (``prepare``), and the resumable distributed loader."""

from lrm_train.data.config import DataConfig
from lrm_train.data.loader import BatchLoader, TokenData, TokenSplit, validation_batches, validation_windows

__all__ = ["BatchLoader", "DataConfig", "TokenData", "TokenSplit", "validation_batches", "validation_windows"]
