"""Downstream evaluation with lm-evaluation-harness: our ``lrm_train`` harness model, offline task data, bits per
byte. ``python -m lrm_train.eval CHECKPOINT [tasks=...] [limit=N]``; from Python, ``evaluate_checkpoint``.

In the training loop: ``callback.DownstreamEval``, which ``configs/train.yaml`` attaches (``eval.tasks=[...]``).
"""

from lrm_train.eval.api import evaluate_checkpoint
from lrm_train.eval.model import LRMHarnessLM
from lrm_train.eval.scoring import correct_continuation_bpb, run_harness, validation_bpb
from lrm_train.eval.tasks import DEFAULT_TASKS, OFFLINE_TASKS

__all__ = [
    "DEFAULT_TASKS",
    "OFFLINE_TASKS",
    "LRMHarnessLM",
    "correct_continuation_bpb",
    "evaluate_checkpoint",
    "run_harness",
    "validation_bpb",
]
