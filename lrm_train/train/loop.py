"""The training loop: it takes steps and calls the callbacks; everything else is a component or a callback.

cfg = compose(overrides)                        # train/config.py: the one config path
engine = build_engine(cfg.dist)                 # distributed/: single, DDP, ZeRO
run_dir = RunDirectory(...)                     # train/run_dir.py: created, locked, logged into
components = build(cfg, engine)                 # train/build.py: data, model, classes, optimizer, loader
callbacks = build_callbacks(cfg)                # train/callbacks/: speed, trajectories, eval, sinks, checkpoints
Trainer(...).fit()                              # steps + hooks
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from lrm_train.cli import BAD_INPUT, CommandEnding, Interrupted
from lrm_train.distributed import Engine, build_engine
from lrm_train.optim import format_table, lr_factor, set_learning_rates
from lrm_train.optim import micro_batches as count_micro_batches
from lrm_train.train.build import Components, build, seed_everything
from lrm_train.train.callbacks import Callback, Checkpointer, Evaluator, MetricSinks, StepResult, build_callbacks
from lrm_train.train.checkpoint import FORMAT, check_resumable, complete_checkpoints, load_weights, run_section
from lrm_train.train.config import RunConfig, validate
from lrm_train.train.preemption import Stopped, StopSignals
from lrm_train.train.run_dir import RunDirectory
from lrm_train.utils import first_line

log = logging.getLogger("lrm_train")

# A rank that did not exist when the checkpoint was saved seeds itself apart from the others (and from the step).
_NEW_RANK_SEED_STRIDE = 1000


class NonFiniteSteps(RuntimeError):
    pass


class CallbackFailed(CommandEnding):
    """A callback raised: the line names it and what was kept."""

    exit_code = BAD_INPUT  # the user's code, not the run, failed: fix it and run the same command


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    final_val_loss: float | None
    last_checkpoint: Path | None
    metrics_file: Path
    wandb_dir: str | None


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    bad_in_row: int = 0  # not saved: a resumed run starts with a clean record

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen, self.skipped_steps = state["step"], state["tokens_seen"], state["skipped_steps"]


def _rng_state() -> dict:
    numpy_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    def __init__(
        self, cfg: RunConfig, engine: Engine, run_dir: Path, components: Components, callbacks: list[Callback]
    ) -> None:
        self.cfg, self.engine, self.run_dir = cfg, engine, run_dir
        self.components = components
        self.optimizer = components.optimizer
        self.callbacks = callbacks
        self.checkpointer = next(c for c in callbacks if isinstance(c, Checkpointer))
        self.state = TrainState()
        self.unsettled: list[tuple[int, torch.Tensor]] = []  # (step, applied flag on the device) not yet read
        self.failed = False
        dtype = cfg.train.precision.autocast_dtype(cuda=engine.device.type == "cuda")
        self.autocast = (lambda: torch.autocast(engine.device.type, dtype=dtype)) if dtype else contextlib.nullcontext
        for callback in callbacks:
            callback.setup(self)
        self.checkpointer.resume(self, cfg.train.resume)
        self.set_learning_rate()  # from the start, so that the class table logged there shows the LRs of the next step

    def config_dict(self) -> dict:
        return OmegaConf.to_container(OmegaConf.structured(self.cfg))

    # State: the union of the components' and callbacks' states, under stable keys.

    def state_dict(self) -> dict:
        """Collective: every rank contributes its RNG state. The model and optimizer states are not in it: every rank
        writes its own pieces of them (``Engine.model_shards``/``optimizer_shards``), and a load puts them back under
        ``optimizer`` (see ``checkpoint.load_checkpoint``)."""
        self.settle_skipped_steps()
        callback_states = {cb.name: cb.state_dict() for cb in self.callbacks}
        return {
            "format": FORMAT,
            "run": self.run_section,
            "trainer": self.state.state_dict(),
            "loader": self.components.loader.state_dict(),
            "rng": self.engine.all_gather_object(_rng_state()),
            "callbacks": {name: state for name, state in callback_states.items() if state},
        }

    @functools.cached_property
    def run_section(self) -> dict:
        """Made once: it hashes the tokenizer and renders the config, which would otherwise stall every save."""
        data = self.components.data
        return run_section(self.cfg, self.components.global_batch, data.folder, data.tokenizer_path)

    def load_state_dict(self, state: dict, model_state: dict, path: Path) -> None:
        c = self.components
        check_resumable(state["run"], self.run_section, path)
        load_weights(self.engine.load_model_state, model_state, path)
        if state["optimizer"] is not None:
            self.engine.load_optimizer_state(state["optimizer"])
        elif state["trainer"]["step"] < self.cfg.train.max_steps:
            raise ValueError(
                f"checkpoint {path}: holds the model only (train.final_checkpoint=weights), not the optimizer's state, "
                f"so the run cannot train on to train.max_steps={self.cfg.train.max_steps}; resume an earlier "
                f"checkpoint (train.resume=PATH) or start a new run from these weights (train.init_from={path})"
            )
        try:
            c.loader.load_state_dict(state["loader"])
        except ValueError as e:
            raise ValueError(f"checkpoint {path}: {e}") from None
        for callback in self.callbacks:
            if callback.name in state["callbacks"]:
                callback.load_state_dict(state["callbacks"][callback.name])
        self.state.load_state_dict(state["trainer"])
        ranks = state["rng"]
        if self.engine.rank < len(ranks):
            _set_rng_state(ranks[self.engine.rank])
        else:  # resumed on more ranks than were saved
            seed_everything(self.cfg.train.seed + _NEW_RANK_SEED_STRIDE * self.engine.rank + self.state.step)

    # Steps.

    def train_step(self) -> StepResult:
        cfg, engine, c = self.cfg, self.engine, self.components
        started = time.perf_counter()
        accum = cfg.train.grad_accum
        micro_batches = count_micro_batches(cfg.schedule, accum, self.state.step)
        lr = self.set_learning_rate()
        inputs, targets = next(c.loader)
        loss_sum = torch.zeros((), device=engine.device)
        micro = cfg.train.micro_batch_size
        for i, (x, y) in enumerate(zip(inputs.split(micro), targets.split(micro))):
            if i == micro_batches:
                break
            with engine.accumulating(last=i == micro_batches - 1), self.autocast():
                x, y = x.to(engine.device, non_blocking=True), y.to(engine.device, non_blocking=True)
                out = engine.model(x, y, cfg.train.z_loss)
                engine.backward(out.loss / micro_batches)
            loss_sum += out.cross_entropy.detach() / micro_batches
        loss = engine.all_reduce_mean(loss_sum)
        norms, applied = engine.optimizer_step(cfg.train.grad_clip, torch.isfinite(loss))
        s = self.state
        s.step += 1
        tokens = micro_batches * micro * engine.world_size * cfg.data.seq_len
        s.tokens_seen += tokens
        self.unsettled.append((s.step, applied))
        last = s.step == cfg.train.max_steps
        if s.step % cfg.train.log_every == 0 or last:
            self.settle_skipped_steps()  # the interval's one wait for the device, counted in this step's time
        seconds = time.perf_counter() - started
        return StepResult(s.step, loss, norms.clipped, norms.multipliers, applied, lr, tokens, seconds, last)

    def set_learning_rate(self) -> float:
        """Set every group's LR for step ``state.step`` and return the base of them: ``optim.lr`` times the schedule's
        factor at the batch share the ramp uses then. The only writer of the optimizer's LRs."""
        cfg, step, accum = self.cfg, self.state.step, self.cfg.train.grad_accum
        used = count_micro_batches(cfg.schedule, accum, step) / accum
        lr = cfg.optim.lr * lr_factor(cfg.schedule, step, cfg.train.max_steps, used)
        set_learning_rates(self.optimizer, lr)
        return lr

    def settle_skipped_steps(self) -> None:
        """Read whether the steps since the last call were applied (one host sync for all of them) and account for the
        skipped ones: ``skipped_steps``, ``bad_in_row``, a warning each; ``NonFiniteSteps`` if ``train.max_bad_steps``
        came in a row. The loop calls it at log steps, at the end and before a checkpoint, so a run of bad steps is
        stopped up to ``train.log_every - 1`` steps after it happened (the model was not updated by those steps)."""
        if not self.unsettled:
            return
        steps = [step for step, _ in self.unsettled]
        applied = torch.stack([flag for _, flag in self.unsettled]).tolist()
        self.unsettled = []
        s, limit, stop_at = self.state, self.cfg.train.max_bad_steps, None
        for step, was_applied in zip(steps, applied):
            if was_applied:
                s.bad_in_row = 0
                continue
            s.skipped_steps += 1
            s.bad_in_row += 1
            log.warning("step %d: non-finite loss or gradient, step skipped", step)
            if s.bad_in_row >= limit and stop_at is None:
                stop_at = step
        if stop_at is not None:
            seen = "" if stop_at == s.step else f", seen at step {s.step}"
            raise NonFiniteSteps(
                f"{limit} non-finite steps in a row (train.max_bad_steps={limit}) at step {stop_at}{seen}; "
                "the model was not updated by them"
            )

    def fit(self) -> None:
        t = self.cfg.train
        stopped_together = False  # every rank agreed to stop (a callback failed somewhere, or a signal came)
        try:
            if failure := self.run_hooks("on_start"):
                raise failure
            with StopSignals() as stop_signals:
                while self.state.step < t.max_steps:
                    step = self.train_step()
                    failure = self.run_hooks("on_step", step)
                    # Every rank stops at the same step (the checkpoint save that follows is collective).
                    any_failed, signum = self.engine.max_over_ranks([failure is not None, stop_signals.received])
                    stopped_together = bool(any_failed or (signum and not step.last))
                    if any_failed:
                        raise failure or CallbackFailed(f"a callback failed at step {step.step} on another rank")
                    if signum and not step.last:
                        raise Stopped(
                            f"{signal.Signals(signum).name} at step {self.state.step}; saved the checkpoint "
                            f"{self.checkpointer.save_current(self)} (run the same command to resume from it)",
                            signum,
                        )
                    if t.stop_at_step and self.state.step >= t.stop_at_step:
                        log.info("stopping at step %d (train.stop_at_step)", self.state.step)
                        break
            self.settle_skipped_steps()
        except NonFiniteSteps as e:
            self.failed = True
            path = self.checkpointer.save_emergency(self)
            raise RuntimeError(f"{e}; emergency checkpoint: {path}") from None
        except CallbackFailed as e:
            self.failed = True
            # The step itself completed and the other callbacks ran (its metrics are written): its state is sound.
            kept = self.checkpointer.save_current(self) if self.state.step else None
            raise CallbackFailed(f"{e}; {self._kept(kept)}") from None
        except KeyboardInterrupt:
            self.failed = True
            raise Interrupted(f"interrupted at step {self.state.step}; {self._kept(self.checkpointer.last)}") from None
        except BaseException:
            self.failed = True
            raise
        finally:
            failure = self.run_hooks("on_end")
            if stopped_together:
                # A launcher tears down every rank once one exits: none may exit while another still finishes.
                self.engine.max_over_ranks([0])
            if failure:
                if not self.failed:
                    raise failure
                log.warning("%s", failure)  # the run's own failure is the one to report

    def run_hooks(self, hook: str, *args) -> CallbackFailed | None:
        """Call ``hook`` on every callback in order. One that fails does not keep the others from running (so a step's
        metrics are still written); the first failure is returned as ``CallbackFailed``, naming the callback.
        The trainer's own failures (non-finite steps, a checkpoint that cannot be written) are raised as they are."""
        failure = None
        for callback in self.callbacks:
            try:
                getattr(callback, hook)(self, *args)
            except NonFiniteSteps:
                raise
            except Exception as e:
                if callback is self.checkpointer:
                    raise
                when = f"at step {args[0].step}" if args else {"on_start": "at the start", "on_end": "at the end"}[hook]
                failure = failure or CallbackFailed(
                    f"callbacks.{callback.name} failed {when} ({type(e).__name__}: {first_line(e)})"
                )
        return failure

    @staticmethod
    def _kept(checkpoint: Path | None) -> str:
        if checkpoint is None:
            return "no checkpoint was written yet"
        return f"kept the checkpoint {checkpoint} (run the same command to resume from it)"

    def result(self) -> TrainResult:
        evaluator = next((c for c in self.callbacks if isinstance(c, Evaluator)), None)
        sinks = next((c for c in self.callbacks if isinstance(c, MetricSinks)), None)
        return TrainResult(
            self.run_dir,
            self.state.step,
            evaluator.last_loss if evaluator else None,
            self.checkpointer.last,
            self.run_dir / "metrics.jsonl",
            sinks.wandb_dir if sinks else None,
        )

    def log_start(self) -> None:
        c, warmup, steps = self.components, self.cfg.schedule.warmup_steps, self.cfg.train.max_steps
        if warmup > steps:
            log.warning(
                "schedule.warmup_steps=%d is longer than train.max_steps=%d: the warmup takes the whole run",
                warmup,
                steps,
            )
        log.info("parameter classes (what the optimizer holds):\n%s", format_table(self.engine.class_rows()))
        log.info(
            "model: %s parameters, %.3g FLOPs/token; global batch %d x %d tokens; world size %d",
            f"{c.num_params:,}",
            c.flops_per_token,
            c.global_batch,
            self.cfg.data.seq_len,
            self.engine.world_size,
        )


def resolved(cfg: RunConfig) -> RunConfig:
    """Resolve interpolations (``${experiment.name}``) and re-run every group's validation."""
    return OmegaConf.to_object(OmegaConf.structured(cfg))


@contextlib.contextmanager
def open_trainer(cfg: RunConfig):
    """A ready trainer (engine, locked run dir, components, callbacks, resumed), closed on exit."""
    cfg = resolved(cfg)
    validate(cfg)
    engine = build_engine(cfg.dist)
    run_dir = None
    try:
        run_dir = RunDirectory(cfg.train.run_dir, engine, cfg.train.resume)
        resuming = cfg.train.resume != "none" and (cfg.train.resume != "auto" or complete_checkpoints(run_dir.path))
        components = build(cfg, engine, fresh_start=not resuming)
        trainer = Trainer(cfg, engine, run_dir.path, components, build_callbacks(cfg))
        if engine.is_main:  # only now: a refused resume must not replace the run's config
            (run_dir.path / "config.yaml").write_text(OmegaConf.to_yaml(trainer.config_dict()))
            trainer.log_start()
        yield trainer
    finally:
        if run_dir is not None:
            run_dir.close()
        engine.close()


def train(cfg: RunConfig) -> TrainResult:
    with open_trainer(cfg) as trainer:
        if trainer.state.step >= cfg.train.max_steps:  # resumed at its end: a second `make train`, say
            if trainer.engine.is_main:
                log.info(
                    "%s already finished at step %d (train.max_steps=%d); nothing to do. To train longer, raise "
                    "train.max_steps: the run resumes from %s",
                    trainer.run_dir,
                    trainer.state.step,
                    cfg.train.max_steps,
                    trainer.checkpointer.last,
                )
            return trainer.result()
        trainer.fit()
        result = trainer.result()
        if trainer.engine.is_main:
            log.info(
                "done at step %d: val loss %s; checkpoint %s; metrics %s; W&B %s",
                result.step,
                "n/a" if result.final_val_loss is None else f"{result.final_val_loss:.4f}",
                result.last_checkpoint,
                result.metrics_file,
                result.wandb_dir,
            )
        return result
