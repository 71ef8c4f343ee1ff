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
from enum import StrEnum


class ScheduleName(StrEnum):
    """``schedule.name`` (see the module docstring)."""

    constant_exp_decay = "constant_exp_decay"
    cosine = "cosine"
    wsd = "wsd"
    constant = "constant"

    @property
    def decays(self) -> bool:
        """Whether it holds the LR, then decays it over the final ``decay_fraction`` of training."""
        return self in (ScheduleName.constant_exp_decay, ScheduleName.wsd)


@dataclass
class ScheduleConfig:
    name: ScheduleName = ScheduleName.constant_exp_decay
    warmup_steps: int = 20
    decay_fraction: float = 1 / 6
    decay_factor: float = 8.0
    min_lr_ratio: float = 0.1
    batch_ramp_steps: int = 0
    batch_ramp_start: float = 0.25

    def __post_init__(self) -> None:
        # Built from plain strings too (ScheduleConfig(name="wsd")): keep the enum.
        if self.name not in set(ScheduleName):
            raise ValueError(f"schedule.name={self.name!r} is not one of {', '.join(ScheduleName)}")
        self.name = ScheduleName(self.name)
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


def micro_batches(cfg: ScheduleConfig, grad_accum: int, step: int) -> int:
    """Micro-batches accumulated at ``step``: the ramp's share of ``grad_accum``, rounded up, at least one."""
    return max(1, math.ceil(grad_accum * batch_fraction(cfg, step)))


def decay_start(cfg: ScheduleConfig, total_steps: int) -> int:
    """The step where a constant-then-decay schedule starts to decay; ``total_steps`` for one that never holds."""
    if cfg.name.decays:
        return total_steps - round(cfg.decay_fraction * total_steps)
    return total_steps


def constant_phase(cfg: ScheduleConfig, total_steps: int) -> tuple[int, int] | None:
    """The steps ``(first, end)`` during which the LR holds at its peak: from the end of the warmup to the decay's
    start (``end`` excluded); None for a schedule that never holds it (cosine) or a warmup that reaches the decay."""
    if cfg.name is ScheduleName.cosine:
        return None
    first, end = min(cfg.warmup_steps, total_steps), decay_start(cfg, total_steps)
    return (first, end) if first < end else None


def lr_factor(cfg: ScheduleConfig, step: int, total_steps: int, used_batch_fraction: float = 1.0) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total_steps``. A warmup longer than the run
    takes the whole run (a short test run keeps the default warmup)."""
    warmup = min(cfg.warmup_steps, total_steps)
    if step < warmup:
        factor = (step + 1) / warmup
    else:
        if cfg.name is ScheduleName.cosine:
            progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
            factor = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        elif cfg.name is ScheduleName.constant or step < decay_start(cfg, total_steps):
            factor = 1.0
        else:
            start = decay_start(cfg, total_steps)
            progress = (step - start + 1) / max(1, total_steps - start)
            if cfg.name is ScheduleName.constant_exp_decay:
                factor = cfg.decay_factor ** (-progress)
            else:
                factor = 1 - (1 - cfg.min_lr_ratio) * progress
    return factor * math.sqrt(used_batch_fraction)


def summed_lr_factor(cfg: ScheduleConfig, total_steps: int, grad_accum: int) -> float:
    """Sum over the steps of ``lr_factor`` (batch ramp included): times a peak LR, the summed LR of a run - how far
    a parameter under Adam can travel at most, and with the weight decay, how many equilibration times it lasts."""
    return sum(
        lr_factor(cfg, step, total_steps, micro_batches(cfg, grad_accum, step) / grad_accum)
        for step in range(total_steps)
    )


def equilibration_times(
    cfg: ScheduleConfig, total_steps: int, grad_accum: int, lr: float, weight_decay: float
) -> float:
    """Sum over the steps of ``lr_t x wd``: how many equilibration times (1 / (lr x wd) steps each) of decoupled
    weight decay (``W *= 1 - lr_t x wd`` per step, AdamW's and Muon's) a run of peak LR ``lr`` lasts. Below 1 the
    weight norms are still set by their init and early growth, not by the noise-WD equilibrium."""
    return lr * weight_decay * summed_lr_factor(cfg, total_steps, grad_accum)
