"""Experiments: the LRM-vs-muP comparison and the paper's analyses, each a command over the normal trainer.

An experiment command has a settings dataclass holding every default and ``configs/<command>.yaml``, which picks an
option of the ``experiment`` group (``configs/experiment/<option>.yaml``, package ``_global_``); both are composed by
``config_compose.compose_schema`` like the trainer's config. (The trainer's ``experiment.name`` key is unrelated: it
composes ``configs/train.yaml``, which has no ``experiment`` group.) Each run is then composed by the trainer's own
``compose`` and trained by ``train``; ``runner`` skips finished runs and resumes unfinished ones.
"""
