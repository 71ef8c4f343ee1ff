"""Where metrics go (rank 0 only): ``metrics.jsonl`` in the run dir, Weights & Biases, and the console.

``metrics.jsonl`` is strict JSON (a non-finite number is written as null) with one record per step, stamped with the
wall-clock time: a resumed run first drops the records of steps after its checkpoint, which the interrupted process
wrote and the resumed one will write again.

Every ``train.log_every`` steps one plain line (step, loss, lr, grad norm, tokens/s, MFU, memory, ETA) goes to
``train_rank0.log`` and, when the console is not a terminal (Slurm, CI, a redirect), to the console too; on a terminal
the console gets a progress bar instead (``logging.progress``), which a file would only fill with carriage returns.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
import uuid
from pathlib import Path

import torch
from tqdm import tqdm

from lrm_train.train.callbacks.base import Callback, StepResult
from lrm_train.train.config import LoggingConfig, WandbMode
from lrm_train.utils import atomic_write_text

METRICS_FILE = "metrics.jsonl"
log = logging.getLogger("lrm_train")


def _finite_or_none(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _written_up_to(line: str, step: int) -> bool:
    try:
        return json.loads(line)["step"] <= step
    except (json.JSONDecodeError, KeyError, TypeError):  # a record cut short when the process died
        return False


def _keep_records_up_to(path: Path, step: int) -> None:
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _written_up_to(line, step)]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(kept))


class MetricSinks(Callback):
    name = "sinks"

    def __init__(self, cfg: LoggingConfig, run_name: str, max_steps: int, tags: list[str] = ()) -> None:
        self.cfg, self.run_name, self.max_steps, self.tags = cfg, run_name, max_steps, list(tags)
        self.jsonl = self.wandb_run = self.progress = None
        self.started, self.first_step = 0.0, 0  # this process's clock and step, for the ETA

    @property
    def wandb_dir(self) -> str | None:
        return None if self.wandb_run is None else str(Path(self.wandb_run.dir).parent)

    def on_start(self, trainer) -> None:
        if not trainer.engine.is_main:
            return
        run_dir = trainer.run_dir
        _keep_records_up_to(run_dir / METRICS_FILE, trainer.state.step)
        self.jsonl = open(run_dir / METRICS_FILE, "a")  # noqa: SIM115 - appended to for the whole run
        if self.cfg.wandb.mode is not WandbMode.disabled:
            import wandb

            # One W&B run per run directory: a resumed run appends to it.
            id_file = run_dir / "wandb_id.txt"
            if not id_file.exists():
                id_file.write_text(uuid.uuid4().hex[:12])
            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb_run = wandb.init(
                project=self.cfg.wandb.project,
                entity=self.cfg.wandb.entity,
                group=self.cfg.wandb.group,
                mode=self.cfg.wandb.mode,
                dir=str(run_dir),
                name=self.run_name,
                tags=self.tags,
                id=id_file.read_text().strip(),
                resume="allow",
                config=trainer.config_dict(),
            )
        if self.cfg.progress and sys.stderr.isatty():
            self.progress = tqdm(total=self.max_steps, initial=trainer.state.step, desc="train", dynamic_ncols=True)
        self.started, self.first_step = time.monotonic(), trainer.state.step

    def on_step(self, trainer, step: StepResult) -> None:
        if not trainer.engine.is_main:
            return
        if step.metrics:
            record = {k: _finite_or_none(v) for k, v in step.metrics.items()}
            record["time"] = round(time.time(), 3)
            self.jsonl.write(json.dumps({"step": step.step, **record}, allow_nan=False) + "\n")
            self.jsonl.flush()
            if self.wandb_run is not None:
                self.wandb_run.log(step.metrics, step=step.step)
        if "loss" in step.metrics:
            # The bar has the console; the line then goes to the log file only.
            log.info("%s", self.step_line(trainer, step), extra={"console": self.progress is None})
        if self.progress is not None:
            if "loss" in step.metrics:
                tokens_per_s = step.metrics["tokens_per_s"]
                self.progress.set_postfix(
                    loss=f"{step.metrics['loss']:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False
                )
            self.progress.update(1)

    def step_line(self, trainer, step: StepResult) -> str:
        m = step.metrics
        done = step.step - self.first_step
        eta = (time.monotonic() - self.started) / max(done, 1) * (self.max_steps - step.step)
        return (
            f"step {step.step}/{self.max_steps} loss {m['loss']:.4f} lr {m['lr']:.3g} grad_norm {m['grad_norm']:.3g} "
            f"tokens/s {m['tokens_per_s']:,.0f} mfu {m['mfu']:.1%} memory {_peak_memory_gb(trainer.engine.device):.2f} GB "
            f"eta {_duration(eta)}"
        )

    def on_end(self, trainer) -> None:
        for closeable in (self.jsonl, self.progress):
            if closeable is not None:
                closeable.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _peak_memory_gb(device: torch.device) -> float:
    """Peak allocated CUDA memory on a GPU; the process's peak resident set elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
