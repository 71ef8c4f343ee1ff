"""``python -m lrm_train.eval PATH [tasks=a,b,...] [limit=N] [batch_size=8] [device=cpu|cuda] [out=FILE.json]
[tokenizer=FILE]``

PATH: a training checkpoint, a run directory (its newest checkpoint that verifies), an lrm_train model folder or an
exported HF folder. tasks: names (default: the offline set; ``mmlu`` for its 57 subjects). limit: the first N items
per task (a fraction below 1: that share). tokenizer: for a model folder without one, or a checkpoint written before
checkpoints carried theirs (a checkpoint refuses any other than its own).
The results JSON goes into the run directory (``<run>/eval/<checkpoint>.json``) or to ``out=`` (never inside a
checkpoint); it is checked before any scoring and rewritten after each task, saying which tasks are done.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from lrm_train.eval.tasks import DEFAULT_TASKS
from lrm_train.utils import stderr_line

_KEYS = ("tasks", "limit", "batch_size", "device", "out", "tokenizer")


def parse(argv: list[str]) -> tuple[Path, dict]:
    """PATH and the options, each checked here (one line naming the key) before anything is loaded."""
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if argv else 2)
    path, options = Path(argv[0]), {}
    for arg in argv[1:]:
        key, eq, value = arg.partition("=")
        if not eq or key not in _KEYS:
            raise ValueError(f"{arg}: expected one of {', '.join(k + '=' for k in _KEYS)}")
        options[key] = value
    if not path.exists():
        raise ValueError(f"{path}: no such checkpoint, run directory or model folder")
    options["tasks"] = [t for t in options.get("tasks", ",".join(DEFAULT_TASKS)).split(",") if t]
    if "limit" in options:
        limit = _number(options, "limit", float)
        if not 0 < limit < math.inf:  # reached the harness as an empty task or an islice error
            raise ValueError(f"limit={options['limit']}: must be > 0 (the first N items per task, or a share below 1)")
        options["limit"] = int(limit) if limit >= 1 else limit
    if "batch_size" in options:
        batch_size = _number(options, "batch_size", int)
        if batch_size < 1:
            raise ValueError(f"batch_size={options['batch_size']}: must be >= 1")
        options["batch_size"] = batch_size
    if "device" in options:
        _check_device(options["device"])
    if "tokenizer" in options:
        from lrm_train.hf.tokenizer import tokenizer_argument

        options["tokenizer"] = tokenizer_argument(options["tokenizer"], "tokenizer")
    if options["tasks"]:
        from lrm_train.eval.tasks import task_specs

        task_specs(options["tasks"])  # an unknown task name fails here, not after the tasks before it
    return path, options


def _number(options: dict, key: str, kind: type) -> float:
    try:
        return kind(options[key])
    except ValueError:
        raise ValueError(f"{key}={options[key]}: not a number") from None


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
    from lrm_train.utils import atomic_write_text

    out, saved = None, None  # saved: the tasks done as of the last write that succeeded

    def write(results: dict) -> None:
        nonlocal saved
        atomic_write_text(out, json.dumps(results, indent=2))
        saved = list(results["tasks_done"])

    try:
        path, options = parse(sys.argv[1:] if argv is None else argv)
        given_out = options.pop("out", "")
        out = check_output(Path(given_out)) if given_out else None  # before loading anything
        from lrm_train.eval.api import evaluate_artifact
        from lrm_train.hf.artifact import open_artifact

        artifact = open_artifact(path, options.pop("tokenizer", None))
        out = out or check_output(default_output(artifact))
        results = evaluate_artifact(artifact, **options, on_progress=write)
    except (ValueError, OSError) as e:
        stderr_line(f"error: {e}")
        if saved is not None:
            stderr_line(f"note: {out} keeps what was scored before that (tasks done: {', '.join(saved) or 'none'})")
        return 2
    if results["val_bpb"] is None:
        stderr_line(f"note: no validation bpb: {results['val_bpb_unavailable']}")
    for task, metrics in results["tasks"].items():
        print(task, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    if results["val_bpb"] is not None:
        print(f"validation bpb {results['val_bpb']:.4f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
