"""lrm_train: pretraining Falcon-H1-style hybrid language models with learnable multipliers."""

__version__ = "0.1.0"
