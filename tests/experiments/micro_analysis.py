"""Seconds-long trainer overrides for the analyses' tests (the micro model of tests/runs.py, a couple of steps)."""

from tests.runs import as_args, overrides


def micro_trainer(data_root, steps: int = 2, model: bool = True) -> list[str]:
    """Trainer overrides of a micro run without its run dir (each analysis gives its runs theirs); ``model=False``
    leaves the model's shape to the analysis (the width sweeps)."""
    values = overrides(data_root, "unused", **{"train.max_steps": steps, "train.eval_every": steps})
    values.update({"train.ckpt_every": steps, "schedule.warmup_steps": 1, "data.seq_len": 16, "data.val_windows": 2})
    values = {k: v for k, v in values.items() if k != "train.run_dir" and (model or not k.startswith("model."))}
    if not model:
        values["model.vocab_size"] = 512
    return as_args(values)


def is_png_with_content(path) -> bool:
    data = path.read_bytes()
    return data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 2000
