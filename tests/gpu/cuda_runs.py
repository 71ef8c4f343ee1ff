"""What the GPU tests share: their marks, and a micro run through the trainer CLI on the GPU in bf16."""

import json
import math

import pytest
import torch
from runs import as_args, cli, overrides

# Every GPU test: selected by `make test-gpu` (pytest -m gpu), and a clean skip where torch sees no CUDA device.
GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make test-gpu)")]

# The GPU is picked by dist.device=auto (cuda:LOCAL_RANK when CUDA is available); bf16 autocast is named explicitly.
BF16 = {"train.precision": "bf16"}

# Metrics that are a function of the weights, the data and the step - not of the clock.
EXACT_KEYS = ("loss", "grad_norm", "lr", "tokens_seen", "skipped_steps", "val_loss")
EXACT_PREFIXES = ("norm/", "norm_eff/", "lrm/", "abm/")


def train_on_gpu(data_root, run_dir, nproc: int = 0, **extra) -> dict[int, dict]:
    """Run the micro model of tests/runs.py (under torchrun with ``nproc`` ranks when given); its metrics by step."""
    done = cli(as_args(overrides(data_root, run_dir, **BF16, **extra)), nproc=nproc)
    assert done.returncode == 0, done.stderr[-3000:]
    return metrics(run_dir)


def metrics(run_dir) -> dict[int, dict]:
    """step -> record of metrics.jsonl (a resumed run appends; later lines win)."""
    records = {}
    with open(f"{run_dir}/metrics.jsonl") as f:
        for line in f:
            record = json.loads(line)
            records[record["step"]] = record
    return records


def exact_part(record: dict) -> dict:
    return {k: v for k, v in record.items() if k in EXACT_KEYS or k.startswith(EXACT_PREFIXES)}


def finite_losses(records: dict[int, dict]) -> list[float]:
    losses = [records[step]["loss"] for step in sorted(records)]
    assert all(math.isfinite(loss) for loss in losses), losses
    return losses
