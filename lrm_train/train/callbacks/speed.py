"""Loss, gradient norms, learning rate, throughput and MFU every ``log_every`` steps."""

from __future__ import annotations

from lrm_train.train.callbacks.base import Callback, StepResult, due


class SpeedMonitor(Callback):
    name = "speed"

    def __init__(self, every: int, peak_tflops: float) -> None:
        self.every, self.peak_tflops = every, peak_tflops
        self.tokens, self.seconds = 0, 0.0  # training steps only: evaluation and checkpoints are not counted

    def on_step(self, trainer, step: StepResult) -> None:
        self.tokens += step.tokens
        self.seconds += step.seconds
        if not due(step, self.every):
            return
        tokens_per_s = self.tokens / max(self.seconds, 1e-9)
        peak = self.peak_tflops * 1e12 * trainer.engine.world_size
        step.metrics.update(
            loss=float(step.loss),
            grad_norm=float(step.grad_norm),
            lr=step.lr,
            tokens_per_s=tokens_per_s,
            tokens_seen=trainer.state.tokens_seen,
            skipped_steps=trainer.state.skipped_steps,
            mfu=trainer.components.flops_per_token * tokens_per_s / peak,
        )
        if step.grad_norm_multipliers is not None:
            step.metrics["grad_norm_multipliers"] = float(step.grad_norm_multipliers)
        self.tokens, self.seconds = 0, 0.0
