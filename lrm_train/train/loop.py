"""The training loop: data + model -> parameter classes -> optimizer -> engine -> steps -> checkpoints and logs."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from lrm_train.data import BatchLoader, TokenData, validation_batches
from lrm_train.data.prepare import prepare
from lrm_train.distributed import Engine, build_engine
from lrm_train.models import FalconH1LM
from lrm_train.nn import lm_loss
from lrm_train.optim import (
    batch_fraction,
    build_optimizer,
    classify_parameters,
    format_table,
    lr_factor,
    set_learning_rates,
)
from lrm_train.train.checkpoint import (
    checkpoint_root,
    complete_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from lrm_train.train.config import RunConfig, validate
from lrm_train.train.metrics import AdamBrownianMotion, trajectory_metrics
from lrm_train.train.sinks import MetricSinks

log = logging.getLogger("lrm_train")


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    final_val_loss: float | None
    last_checkpoint: Path | None
    metrics_file: Path
    wandb_dir: str | None


def resolved(cfg: RunConfig) -> RunConfig:
    """Resolve interpolations (``${experiment.name}``) and re-run every group's validation."""
    return OmegaConf.to_object(OmegaConf.structured(cfg))


def _setup_logging(run_dir: Path, rank: int) -> None:
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    file_handler = logging.FileHandler(run_dir / f"train_rank{rank}.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(file_handler)
    if rank == 0:
        log.addHandler(logging.StreamHandler())


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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _prepare_data(cfg: RunConfig, engine: Engine) -> TokenData:
    """Rank 0 prepares (or finds) the data; every rank then opens the same folder, or raises rank 0's error."""
    outcome: tuple[str, str] = ("ok", "")
    if engine.is_main:
        try:
            outcome = ("ok", str(prepare(cfg.data)))
        except (ValueError, OSError) as e:
            outcome = ("error", str(e))
    status, value = engine.all_gather_object(outcome)[0]
    if status == "error":
        raise ValueError(value)
    data = TokenData(value, verify_checksums=cfg.data.verify_checksums)
    if data.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {data.vocab_size} tokens "
            f"({data.tokenizer_path})"
        )
    return data


def _resume_path(cfg: RunConfig, run_dir: Path) -> Path | None:
    if cfg.train.resume == "none":
        return None
    if cfg.train.resume == "auto":
        found = complete_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(cfg.train.resume)
    if not path.is_dir():
        raise ValueError(f"train.resume={cfg.train.resume}: no such checkpoint folder")
    return path


class Trainer:
    def __init__(self, cfg: RunConfig, engine: Engine) -> None:
        self.cfg, self.engine = cfg, engine
        t = cfg.train
        self.run_dir = Path(t.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _setup_logging(self.run_dir, engine.rank)
        if engine.is_main:
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        _seed_everything(t.seed)
        self.data = _prepare_data(cfg, engine)

        model = FalconH1LM(cfg.model, cfg.lrm).to(engine.device)
        self.classes = classify_parameters(model)
        optimizer = build_optimizer(model, self.classes, cfg.optim, cfg.lrm)
        self.optimizer = engine.setup(model, optimizer, self.classes, t.clip_multipliers)
        self.model = model

        self.global_batch = t.micro_batch_size * t.grad_accum * engine.world_size
        self.loader = BatchLoader(
            self.data.splits["train"],
            cfg.data.seq_len,
            self.global_batch,
            engine.rank,
            engine.world_size,
            seed=t.seed,
            prefetch=cfg.data.prefetch,
        )
        self.abm = AdamBrownianMotion(self.optimizer, cfg.model.init_std, seed=t.seed + 1)
        self.step, self.tokens_seen, self.skipped_steps, self.bad_in_row = 0, 0, 0, 0
        self.last_checkpoint: Path | None = None
        self.autocast = self._autocast()
        self.flops_per_token = model.flops_per_token(cfg.data.seq_len)

        resume_from = _resume_path(cfg, self.run_dir)
        if resume_from is not None:
            self._load(resume_from)
        if engine.is_main:
            log.info("parameter classes (what the optimizer holds):\n%s", format_table(engine.class_rows()))
            log.info(
                "model: %s parameters, %.3g FLOPs/token; global batch %d x %d tokens; world size %d",
                f"{model.num_params():,}",
                self.flops_per_token,
                self.global_batch,
                cfg.data.seq_len,
                engine.world_size,
            )

    def _autocast(self):
        precision = self.cfg.train.precision
        bf16 = precision == "bf16" or (precision == "auto" and self.engine.device.type == "cuda")
        if not bf16:
            return contextlib.nullcontext
        return lambda: torch.autocast(self.engine.device.type, dtype=torch.bfloat16)

    # Checkpoints.

    def _state(self) -> dict:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "skipped_steps": self.skipped_steps,
            "optimizer": self.engine.optimizer_state(),
            "loader": self.loader.state_dict(),
            "abm": self.abm.state_dict(),
            "rng": self.engine.all_gather_object(_rng_state()),
            "model_config": dataclasses.asdict(self.cfg.model),
            "lrm": dataclasses.asdict(self.cfg.lrm),
            "optimizer_name": self.cfg.optim.name,
            "config": OmegaConf.to_yaml(OmegaConf.structured(self.cfg)),
        }

    def save(self, name: str | None = None) -> Path:
        state = self._state()  # every rank takes part (the RNG states are gathered, ZeRO states too)
        model_state = self.engine.model_state()
        path = checkpoint_root(self.run_dir) / (name or f"step_{self.step:08d}")
        if self.engine.is_main:
            save_checkpoint(path, model_state, state)
            if name is None:
                prune_checkpoints(self.run_dir, self.cfg.train.keep_last)
        self.engine.barrier()
        self.last_checkpoint = path
        return path

    def _load(self, path: Path) -> None:
        model_state, state = load_checkpoint(path)
        for key, value in dataclasses.asdict(self.cfg.model).items():
            if state["model_config"].get(key) != value:
                raise ValueError(
                    f"checkpoint {path}: trained with model.{key}={state['model_config'].get(key)!r}, "
                    f"this run has {value!r}"
                )
        if state["lrm"] != dataclasses.asdict(self.cfg.lrm):
            raise ValueError(f"checkpoint {path}: trained with lrm={state['lrm']}, this run has {self.cfg.lrm}")
        if state["optimizer_name"] != self.cfg.optim.name:
            raise ValueError(
                f"checkpoint {path}: trained with optim={state['optimizer_name']}, "
                f"this run has optim={self.cfg.optim.name} (its optimizer state would not fit)"
            )
        self.engine.load_model_state(model_state)
        self.engine.load_optimizer_state(state["optimizer"])
        if state["loader"]["global_batch"] != self.global_batch:
            raise ValueError(
                f"checkpoint {path}: global batch {state['loader']['global_batch']}, this run has {self.global_batch} "
                "(micro_batch_size x grad_accum x world size): adjust train.grad_accum"
            )
        self.loader.load_state_dict(state["loader"])
        self.abm.load_state_dict(state["abm"])
        self.step, self.tokens_seen, self.skipped_steps = state["step"], state["tokens_seen"], state["skipped_steps"]
        ranks = state["rng"]
        if self.engine.rank < len(ranks):
            _set_rng_state(ranks[self.engine.rank])
        else:  # resumed on more ranks than were saved
            _seed_everything(self.cfg.train.seed + 1000 * self.engine.rank + self.step)
        self.last_checkpoint = path
        log.info("resumed from %s at step %d", path, self.step)

    # Steps.

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        cfg, engine = self.cfg, self.engine
        accum = cfg.train.grad_accum
        micro_batches = max(1, math.ceil(accum * batch_fraction(cfg.schedule, self.step)))
        self.lr_scale = lr_factor(cfg.schedule, self.step, cfg.train.max_steps, micro_batches / accum)
        set_learning_rates(self.optimizer, cfg.optim.lr, self.lr_scale)
        inputs, targets = next(self.loader)
        loss_sum = torch.zeros((), device=engine.device)
        for i, (x, y) in enumerate(
            zip(inputs.split(cfg.train.micro_batch_size), targets.split(cfg.train.micro_batch_size))
        ):
            if i == micro_batches:
                break
            with engine.accumulating(last=i == micro_batches - 1), self.autocast():
                out = lm_loss(engine.model(x.to(engine.device)), y.to(engine.device), cfg.train.z_loss)
                engine.backward(out.loss / micro_batches)
            loss_sum += out.cross_entropy.detach() / micro_batches
        loss = engine.all_reduce_mean(loss_sum)
        grad_norm, applied = engine.optimizer_step(cfg.train.grad_clip, bool(torch.isfinite(loss)))
        if applied:
            self.abm.step()
            self.bad_in_row = 0
        else:
            self.skipped_steps += 1
            self.bad_in_row += 1
            log.warning("step %d: non-finite loss or gradient, step skipped", self.step + 1)
        self.step += 1
        tokens = micro_batches * cfg.train.micro_batch_size * engine.world_size * cfg.data.seq_len
        self.tokens_seen += tokens
        return loss, grad_norm, tokens

    @torch.no_grad()
    def evaluate(self) -> float:
        cfg, engine = self.cfg, self.engine
        total = torch.zeros(2, dtype=torch.float64, device=engine.device)
        batches = validation_batches(
            self.data.splits["val"],
            cfg.data.seq_len,
            cfg.data.val_windows,
            cfg.train.eval_batch_size,
            engine.rank,
            engine.world_size,
        )
        for x, y in batches:
            with self.autocast():
                logits = self.model(x.to(engine.device))
            loss = lm_loss(logits, y.to(engine.device)).cross_entropy
            total += torch.stack([loss.double() * y.numel(), torch.tensor(float(y.numel()), device=engine.device)])
        total = engine.all_reduce_mean(total)
        return float(total[0] / total[1])

    def run(self) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        sinks = None
        if self.engine.is_main:
            sinks = MetricSinks(
                cfg.logging,
                self.run_dir,
                cfg.experiment.name,
                OmegaConf.to_container(OmegaConf.structured(cfg)),
                self.step,
                t.max_steps,
            )
        val_loss = None
        window_tokens, window_seconds = 0, 0.0  # training steps only: evaluation and checkpoints are not counted
        try:
            while self.step < t.max_steps:
                started = time.perf_counter()
                loss, grad_norm, tokens = self.train_step()
                window_seconds += time.perf_counter() - started
                window_tokens += tokens
                if self.bad_in_row >= t.max_bad_steps:
                    path = self.save(name=f"emergency_step_{self.step:08d}")
                    raise RuntimeError(
                        f"{self.bad_in_row} non-finite steps in a row (train.max_bad_steps={t.max_bad_steps}) at step "
                        f"{self.step}; the model was not updated by them; emergency checkpoint: {path}"
                    )
                metrics = {}
                last = self.step == t.max_steps
                if self.step % t.log_every == 0 or last:
                    tokens_per_s = window_tokens / max(window_seconds, 1e-9)
                    metrics.update(self._step_metrics(loss, grad_norm, tokens_per_s))
                    window_tokens, window_seconds = 0, 0.0
                if self.step % t.eval_every == 0 or last:
                    val_loss = self.evaluate()
                    metrics["val_loss"] = val_loss
                if self.step % t.ckpt_every == 0 or last:
                    self.save()
                if sinks is not None:
                    if metrics:
                        sinks.log(self.step, metrics)
                    sinks.advance(1, metrics.get("loss"), metrics.get("tokens_per_s"))
                if t.stop_at_step and self.step >= t.stop_at_step:
                    log.info("stopping at step %d (train.stop_at_step)", self.step)
                    break
            if val_loss is None:  # nothing left to train (a finished run resumed): still report where it stands
                val_loss = self.evaluate()
        finally:
            if sinks is not None:
                sinks.close()
        if self.engine.is_main:
            log.info(
                "done at step %d: val loss %s; checkpoint %s; metrics %s; W&B %s",
                self.step,
                "n/a" if val_loss is None else f"{val_loss:.4f}",
                self.last_checkpoint,
                self.run_dir / "metrics.jsonl",
                sinks.wandb_dir if sinks else None,
            )
        return TrainResult(
            self.run_dir,
            self.step,
            val_loss,
            self.last_checkpoint,
            self.run_dir / "metrics.jsonl",
            sinks.wandb_dir if sinks else None,
        )

    def _step_metrics(self, loss: torch.Tensor, grad_norm: torch.Tensor, tokens_per_s: float) -> dict:
        cfg = self.cfg
        peak = cfg.logging.peak_tflops * 1e12 * self.engine.world_size
        metrics = {
            "loss": float(loss),
            "grad_norm": float(grad_norm),
            "lr": cfg.optim.lr * self.lr_scale,
            "tokens_per_s": tokens_per_s,
            "tokens_seen": self.tokens_seen,
            "skipped_steps": self.skipped_steps,
            "mfu": self.flops_per_token * tokens_per_s / peak,
        }
        if cfg.logging.trajectories:
            with self.engine.gathered():
                metrics.update(trajectory_metrics(self.model, self.abm))
        return metrics


def train(cfg: RunConfig) -> TrainResult:
    cfg = resolved(cfg)
    engine = build_engine(cfg.dist)
    try:
        validate(cfg)
        return Trainer(cfg, engine).run()
    finally:
        engine.close()
