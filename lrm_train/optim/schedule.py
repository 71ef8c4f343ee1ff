"""Learning-rate schedules and the batch-size ramp, as pure functions of the step (nothing to checkpoint).

- ``constant_exp_decay`` (the paper's): linear warmup, constant, then an exponential decay by ``decay_factor`` over
  the final ``decay_fraction`` of training (the paper: x8 over the last sixth).
- ``cosine``: linear warmup, then cosine down to ``min_lr_ratio``.
- ``wsd`` (warmup-stable-decay): linear warmup, constant, then linear down to ``min_lr_ratio`` over the final
  ``decay_fraction``.
- ``constant``: linear warmup, then constant.

Batch-size ramp-up (``batch_ramp_steps > 0``): the share of the global batch in use grows linearly from
``batch_ramp_start`` to 1, and the learning rate follows sqrt(batch share).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("constant_exp_decay", "cosine", "wsd", "constant")


@dataclass
class ScheduleConfig:
    name: str = "constant_exp_decay"
    warmup_steps: int = 20
    decay_fraction: float = 1 / 6
    decay_factor: float = 8.0
    min_lr_ratio: float = 0.1
    batch_ramp_steps: int = 0
    batch_ramp_start: float = 0.25

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"schedule.name={self.name!r} is not one of {', '.join(SCHEDULES)}")
        if not 0 <= self.decay_fraction <= 1:
            raise ValueError(f"schedule.decay_fraction={self.decay_fraction} must be in [0, 1]")
        if not 0 < self.batch_ramp_start <= 1:
            raise ValueError(f"schedule.batch_ramp_start={self.batch_ramp_start} must be in (0, 1]")
        if self.decay_factor < 1:
            raise ValueError(f"schedule.decay_factor={self.decay_factor} must be >= 1")


def batch_fraction(cfg: ScheduleConfig, step: int) -> float:
    """Share of the global batch used at ``step`` (0-based)."""
    if cfg.batch_ramp_steps <= 0 or step >= cfg.batch_ramp_steps:
        return 1.0
    return cfg.batch_ramp_start + (1 - cfg.batch_ramp_start) * step / cfg.batch_ramp_steps


def lr_factor(cfg: ScheduleConfig, step: int, total_steps: int, used_batch_fraction: float = 1.0) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total_steps``."""
    if step < cfg.warmup_steps:
        factor = (step + 1) / cfg.warmup_steps
    else:
        decay_start = total_steps - round(cfg.decay_fraction * total_steps)
        if cfg.name == "cosine":
            progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
            factor = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        elif cfg.name == "constant" or step < decay_start:
            factor = 1.0
        else:
            progress = (step - decay_start + 1) / max(1, total_steps - decay_start)
            if cfg.name == "constant_exp_decay":
                factor = cfg.decay_factor ** (-progress)
            else:
                factor = 1 - (1 - cfg.min_lr_ratio) * progress
    return factor * math.sqrt(used_batch_fraction)
