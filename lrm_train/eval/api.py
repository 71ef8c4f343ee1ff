"""``evaluate_checkpoint``: every score of one checkpoint or model folder, as one dict."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from lrm_train.eval.model import LRMHarnessLM, default_device, load_for_eval
from lrm_train.eval.scoring import run_harness, validation_bpb
from lrm_train.eval.tasks import DEFAULT_TASKS
from lrm_train.hf.tokenizer import run_data_folder


def evaluate_checkpoint(
    path: str | Path,
    tasks=DEFAULT_TASKS,
    limit: float | None = None,
    batch_size: int = 8,
    device: str | None = None,
    tokenizer: str | Path | None = None,
) -> dict:
    """``{"tasks": {task: {metric: value}}, "val_bpb": float | None, ...}`` for a checkpoint, run directory, model
    folder or HF folder. ``limit``: items per task (the first N; a float below 1 is a fraction). ``val_bpb``: bits
    per byte on the run's validation windows, for checkpoints (whose run names its data); None otherwise."""
    model, tokenizer_path = load_for_eval(path, tokenizer)
    device = torch.device(device) if device else default_device()
    model = model.to(device).eval()
    lm = LRMHarnessLM(model=model, tokenizer=str(tokenizer_path), device=str(device), batch_size=batch_size)
    scores = run_harness(lm, tasks, limit) if tasks else {}
    return {
        "path": str(path),
        "tasks": scores,
        "limit": limit,
        "val_bpb": _run_validation_bpb(lm, path),
    }


def _run_validation_bpb(lm: LRMHarnessLM, path: str | Path) -> float | None:
    from lrm_train.train.checkpoint import MANIFEST, complete_checkpoints, load_resumable

    path = Path(path)
    if not (path / MANIFEST).exists():
        found = complete_checkpoints(path)
        if not found:
            return None
        path = found[-1]
    run_config = load_resumable(path)[1]["run"]["config"]
    config, folder = OmegaConf.create(run_config), run_data_folder(run_config)
    with lm.autocast():
        return validation_bpb(lm.model, folder, config.data.seq_len, config.data.val_windows)
