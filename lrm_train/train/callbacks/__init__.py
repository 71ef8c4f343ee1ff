"""Callbacks: everything the loop does besides taking steps, each cadence in its own small file.

The loop (``train/loop.py``) calls, in list order:

    setup(trainer)          once, after the components are built and before a checkpoint is loaded
    on_start(trainer)       once, when the loop starts (after a resume)
    on_step(trainer, step)  after every step; ``step.metrics`` collects what callbacks report for it
    on_end(trainer)         once, when the loop ends (normally or not)

A callback with state gives ``state_dict()``/``load_state_dict()``: it is saved in every checkpoint under the
callback's ``name``. Add your own from the config without editing the loop:
``+callbacks.<name>._target_=your.module.YourCallback`` (extra keys are passed to its constructor).
The downstream evaluation (``callbacks.downstream``, ``eval/callback.py``) is attached the same way, by its name,
when ``eval.tasks`` is set: ``eval`` sits above ``train``, and a run without tasks never imports the harness.
"""

from __future__ import annotations

from hydra.utils import instantiate

from lrm_train.train.callbacks.base import Callback, StepResult
from lrm_train.train.callbacks.checkpointer import Checkpointer
from lrm_train.train.callbacks.evaluator import Evaluator, validation_steps
from lrm_train.train.callbacks.mixture import MixtureShares
from lrm_train.train.callbacks.sinks import MetricSinks
from lrm_train.train.callbacks.speed import SpeedMonitor
from lrm_train.train.callbacks.trajectories import Trajectories
from lrm_train.train.config import RunConfig
from lrm_train.utils import first_line

__all__ = [
    "Callback",
    "Checkpointer",
    "Evaluator",
    "MetricSinks",
    "MixtureShares",
    "SpeedMonitor",
    "StepResult",
    "Trajectories",
    "build_callbacks",
    "validation_steps",
]


DOWNSTREAM = "lrm_train.eval.callback.DownstreamEval"


def build_callbacks(cfg: RunConfig) -> list[Callback]:
    """The run's callbacks in calling order: reporters first, then the downstream evaluation (with ``eval.tasks``) and
    the user's, then the sinks that write what they reported, and the checkpointer last (so a checkpoint never holds a
    step whose metrics were not written)."""
    t = cfg.train
    attached = {}
    if cfg.eval.tasks:
        e = cfg.eval
        attached["downstream"] = dict(
            _target_=DOWNSTREAM, tasks=e.tasks, limit=e.limit, every=e.every, batch_size=e.batch_size
        )
    user = []
    for name, spec in {**attached, **cfg.callbacks}.items():
        try:
            callback = instantiate(spec, _convert_="all")
        except Exception as e:  # noqa: BLE001 - an import error, a wrong argument: the user's config either way
            cause = e
            while cause.__cause__ is not None:  # Hydra wraps the real error (a TypeError, an ImportError) in its own
                cause = cause.__cause__
            raise ValueError(
                f"callbacks.{name}: cannot build it ({type(cause).__name__}: {first_line(cause)})"
            ) from None
        if not isinstance(callback, Callback):
            target = spec.get("_target_")
            raise ValueError(f"callbacks.{name}: {target} is not a lrm_train Callback")  # noqa: TRY004 - a config error
        callback.name = name
        user.append(callback)
    return [
        SpeedMonitor(t.log_every, cfg.logging.peak_tflops),
        Trajectories(t.log_every, cfg.logging.trajectories, cfg.optim, seed=t.seed),
        Evaluator(t.eval_every, t.eval_batch_size, cfg.data.seq_len, cfg.data.val_windows, t.eval_last, t.max_steps),
        *([MixtureShares(t.log_every, cfg.data.seq_len)] if cfg.data.mixture else []),
        *user,
        MetricSinks(cfg.logging, cfg.experiment.name, t.max_steps, cfg.experiment.tags),
        Checkpointer(t.ckpt_every, t.keep_last, t.async_checkpoint, t.final_checkpoint),
    ]
