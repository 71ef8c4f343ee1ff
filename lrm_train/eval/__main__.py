"""``python -m lrm_train.eval PATH [tasks=a,b,...] [limit=N] [batch_size=8] [device=cpu|cuda] [out=FILE.json]``

PATH: a training checkpoint, a run directory (its newest checkpoint), an lrm_train model folder or an exported HF
folder. tasks: names (default: the offline set; ``mmlu`` for its 57 subjects). limit: the first N items per task.
The results JSON goes into the run directory (``<run>/eval/<checkpoint>.json``) or to ``out=``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from lrm_train.eval.tasks import DEFAULT_TASKS

_KEYS = ("tasks", "limit", "batch_size", "device", "out", "tokenizer")


def parse(argv: list[str]) -> tuple[Path, dict]:
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
    for key, kind in (("limit", float), ("batch_size", int)):
        if key in options:
            try:
                options[key] = kind(options[key])
            except ValueError:
                raise ValueError(f"{key}={options[key]}: not a number") from None
    if "limit" in options and options["limit"] >= 1:
        options["limit"] = int(options["limit"])
    return path, options


def default_output(path: Path) -> Path:
    from lrm_train.train.checkpoint import MANIFEST, complete_checkpoints

    if (path / MANIFEST).exists():  # runs/<name>/checkpoints/step_N
        return path.parent.parent / "eval" / f"{path.name}.json"
    if complete_checkpoints(path):
        return path / "eval" / f"{complete_checkpoints(path)[-1].name}.json"
    return Path(f"eval_{path.resolve().name}.json")


def main(argv: list[str] | None = None) -> int:
    try:
        path, options = parse(sys.argv[1:] if argv is None else argv)
        out = Path(options.pop("out", None) or default_output(path))
        from lrm_train.eval.api import evaluate_checkpoint

        results = evaluate_checkpoint(path, **options)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(results, indent=2))
    os.replace(partial, out)  # a reader never sees half a file
    for task, metrics in results["tasks"].items():
        print(task, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    if results["val_bpb"] is not None:
        print(f"validation bpb {results['val_bpb']:.4f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
