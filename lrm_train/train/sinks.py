"""Where metrics go (rank 0 only): ``metrics.jsonl`` in the run dir, Weights & Biases, and a progress bar."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from tqdm import tqdm

from lrm_train.train.config import LoggingConfig


class MetricSinks:
    def __init__(
        self, cfg: LoggingConfig, run_dir: Path, run_name: str, config: dict, start_step: int, max_steps: int
    ) -> None:
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        self.wandb_run = None
        if cfg.wandb.mode != "disabled":
            import wandb

            # One W&B run per run directory: a resumed run appends to it.
            id_file = run_dir / "wandb_id.txt"
            if not id_file.exists():
                id_file.write_text(uuid.uuid4().hex[:12])
            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb_run = wandb.init(
                project=cfg.wandb.project,
                entity=cfg.wandb.entity,
                mode=cfg.wandb.mode,
                dir=str(run_dir),
                name=run_name,
                id=id_file.read_text().strip(),
                resume="allow",
                config=config,
            )
        self.progress = (
            tqdm(total=max_steps, initial=start_step, desc="train", dynamic_ncols=True) if cfg.progress else None
        )

    @property
    def wandb_dir(self) -> str | None:
        return None if self.wandb_run is None else str(Path(self.wandb_run.dir).parent)

    def log(self, step: int, metrics: dict) -> None:
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def advance(self, steps: int, loss: float | None = None, tokens_per_s: float | None = None) -> None:
        if self.progress is None:
            return
        if loss is not None:
            self.progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        self.progress.update(steps)

    def close(self) -> None:
        self.jsonl.close()
        if self.progress is not None:
            self.progress.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
