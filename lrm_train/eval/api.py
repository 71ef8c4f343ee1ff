"""``evaluate_checkpoint``: every score of one checkpoint or model folder, as one dict."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from lrm_train.data import TokenData
from lrm_train.eval.model import LRMHarnessLM, default_device
from lrm_train.eval.scoring import run_harness, validation_bpb
from lrm_train.eval.tasks import DEFAULT_TASKS
from lrm_train.train.artifact import Artifact, open_artifact
from lrm_train.utils import sha256_file


def evaluate_checkpoint(
    path: str | Path,
    tasks=DEFAULT_TASKS,
    limit: float | None = None,
    batch_size: int = 8,
    device: str | None = None,
    tokenizer: str | Path | None = None,
    on_progress: Callable[[dict], None] | None = None,
) -> dict:
    """``{"tasks": {task: {metric: value}}, "val_bpb": float | None, ...}`` for a checkpoint, run directory, model
    folder or HF folder. ``limit``: items per task (the first N; a float below 1 is a fraction). ``val_bpb``: bits
    per byte on the validation windows of the data a checkpoint recorded; None (with ``val_bpb_unavailable`` saying
    why) for a model folder or when that data is gone. ``on_progress``: called with the results so far after the
    validation score and after each task (``tasks_done``, ``tasks_pending``)."""
    return evaluate_artifact(open_artifact(path, tokenizer), tasks, limit, batch_size, device, on_progress)


def evaluate_artifact(
    artifact: Artifact,
    tasks=DEFAULT_TASKS,
    limit: float | None = None,
    batch_size: int = 8,
    device: str | None = None,
    on_progress: Callable[[dict], None] | None = None,
) -> dict:
    """``evaluate_checkpoint`` of an artifact already open."""
    device = torch.device(device) if device else default_device()
    model = artifact.model.to(device).eval()
    lm = LRMHarnessLM(model=model, tokenizer=str(artifact.tokenizer), device=str(device), batch_size=batch_size)
    val_bpb, unavailable = _validation_bpb(lm, artifact)
    results = {
        "path": str(artifact.path),
        "checkpoint": str(artifact.checkpoint) if artifact.checkpoint else None,
        "tasks": {},
        "limit": limit,
        "val_bpb": val_bpb,
        "val_bpb_unavailable": unavailable,
        "tasks_done": [],
        "tasks_pending": list(tasks),
    }
    if on_progress:
        on_progress(results)
    # One task at a time, so that a failure (or a crash) keeps the scores of the tasks before it.
    for task in tasks:
        results["tasks"].update(run_harness(lm, [task], limit))
        results["tasks_done"].append(results["tasks_pending"].pop(0))
        if on_progress:
            on_progress(results)
    return results


def _validation_bpb(lm: LRMHarnessLM, artifact: Artifact) -> tuple[float | None, str | None]:
    """(bpb on the validation windows of the data the checkpoint was trained on, None) or (None, why not)."""
    if artifact.run is None:
        return None, "not a training checkpoint, so no training data is known"
    if artifact.data_folder is None:
        return None, f"checkpoint {artifact.checkpoint} was written before checkpoints recorded their data folder"
    try:
        found = sha256_file(TokenData(artifact.data_folder).tokenizer_path)
    except (OSError, ValueError) as e:
        return None, f"the run's data folder is not readable ({e})"
    if found != artifact.run["data"]["tokenizer_sha256"]:
        return None, f"{artifact.data_folder} holds another tokenizer than the one the checkpoint was trained with"
    data = artifact.run_config.data
    with lm.autocast():
        return validation_bpb(lm.model, artifact.data_folder, data.seq_len, data.val_windows), None
