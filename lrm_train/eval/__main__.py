"""``python -m lrm_train.eval PATH [key=value ...]``: the commands' convention (``lrm_train.cli``), the keys and their
defaults in ``EvalCommand`` and ``configs/eval.yaml`` (``--help`` prints them)."""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING

from lrm_train.cli import run_command
from lrm_train.config_compose import compose_schema, help_text
from lrm_train.eval.tasks import DEFAULT_TASKS
from lrm_train.utils import atomic_write_text, stderr_line

USAGE = """usage: python -m lrm_train.eval PATH [tasks=[a,b]] [limit=N] [batch_size=8] [device=cpu|cuda] [out=FILE.json]
                                [tokenizer=FILE]

Scores a model on lm-evaluation-harness tasks (offline data) and, for a training checkpoint, on the validation windows
of the data it was trained on (bits per byte).
"""


@dataclass
class EvalCommand:
    path: str = MISSING
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    limit: float | None = None
    batch_size: int = 8
    device: str | None = None
    out: str | None = None
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        """Every option checked here (one line naming the key) before anything is loaded."""
        if not Path(self.path).exists():
            raise ValueError(f"{self.path}: no such checkpoint, run directory or model folder")
        if self.limit is not None:
            if not 0 < self.limit < math.inf:  # reached the harness as an empty task or an islice error
                raise ValueError(f"limit={self.limit:g}: must be > 0 (the first N items per task, or a share below 1)")
            self.limit = int(self.limit) if self.limit >= 1 else self.limit
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: must be >= 1")
        if self.device is not None:
            _check_device(self.device)
        if self.tokenizer is not None:
            from lrm_train.hf.tokenizer import tokenizer_argument

            tokenizer_argument(self.tokenizer, "tokenizer")
        if self.tasks:
            from lrm_train.eval.tasks import task_specs

            task_specs(self.tasks)  # an unknown task name fails here, not after the tasks before it


def compose(argv: list[str]) -> EvalCommand:
    """PATH (the first argument) and Hydra-style overrides; ``tasks=a,b`` (the older spelling) is ``tasks=[a,b]``."""
    if not argv or "=" in argv[0]:
        raise ValueError("PATH (a checkpoint, run directory or model folder) must come first; see --help")
    overrides = [f"path={argv[0]}"]
    for arg in argv[1:]:
        key, _, value = arg.partition("=")
        overrides.append(f"tasks=[{value}]" if key == "tasks" and not value.startswith("[") else arg)
    return compose_schema("eval", EvalCommand, overrides)


def _check_device(name: str) -> None:
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name}: not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name}: CUDA is not available here")


def default_output(artifact) -> Path:
    """``<run>/eval/<checkpoint>.json`` for the training checkpoint evaluated, else ``eval_<folder>.json`` here."""
    if artifact.checkpoint is not None:
        return artifact.run_dir / "eval" / f"{artifact.checkpoint.name}.json"
    return Path(f"eval_{artifact.path.resolve().name}.json")


def check_output(out: Path) -> Path:
    """Refuse, before any scoring, a results file that could not be written or that training would delete."""
    from lrm_train.hf.outputs import check_outside_checkpoints

    check_outside_checkpoints(out, f"out={out}")
    if out.is_dir():
        raise ValueError(f"out={out}: a folder; name a file (results.json)")
    existing = next(p for p in out.absolute().parents if p.exists())  # the folder that will hold it, or its nearest
    if not existing.is_dir():
        raise ValueError(f"out={out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"out={out}: cannot write in {existing} (read-only or no permission)")
    return out


def main(argv: list[str] | None = None) -> int:
    return run_command(argv, help_text("eval", USAGE), compose, _evaluate)


def _evaluate(cmd: EvalCommand, _flags: list[str]) -> None:
    out = check_output(Path(cmd.out)) if cmd.out else None  # before loading anything
    saved = None  # the tasks done as of the last write that succeeded

    def write(results: dict) -> None:
        nonlocal saved
        atomic_write_text(out, json.dumps(results, indent=2))
        saved = list(results["tasks_done"])

    from lrm_train.eval.api import evaluate_artifact
    from lrm_train.train.artifact import open_artifact

    try:
        artifact = open_artifact(cmd.path, cmd.tokenizer)
        out = out or check_output(default_output(artifact))
        options = dict(tasks=cmd.tasks, limit=cmd.limit, batch_size=cmd.batch_size, device=cmd.device)
        results = evaluate_artifact(artifact, **options, on_progress=write)
    except (ValueError, OSError) as e:
        if saved is None:
            raise
        raise ValueError(
            f"{e}\nnote: {out} keeps what was scored before that (tasks done: {', '.join(saved) or 'none'})"
        )
    if results["val_bpb"] is None:
        stderr_line(f"note: no validation bpb: {results['val_bpb_unavailable']}")
    for task, metrics in results["tasks"].items():
        print(task, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    if results["val_bpb"] is not None:
        print(f"validation bpb {results['val_bpb']:.4f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
