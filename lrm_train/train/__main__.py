"""``python -m lrm_train.train [overrides]`` and ``torchrun --nproc_per_node=N -m lrm_train.train [overrides]``.

Trains a Falcon-H1 hybrid language model with learnable multipliers (or the muP baseline, lrm=none) on one process,
under DDP or DeepSpeed ZeRO; resumes the run directory's newest checkpoint by default.
"""

from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path

from omegaconf import OmegaConf

from lrm_train.cli import BAD_INPUT, run_command
from lrm_train.config_compose import help_text
from lrm_train.distributed import exit_without_shutdown, launched_world_size
from lrm_train.train.config import RunConfig, compose
from lrm_train.train.loop import Interrupted, train
from lrm_train.train.memory import format_estimate
from lrm_train.utils import stderr_line

USAGE = """usage: python -m lrm_train.train [group=option ...] [key=value ...] [--cfg] [--estimate[=N,...]]
       python -m lrm_train.train --config-dir RUN_DIR [key=value ...]
       torchrun --nproc_per_node=N -m lrm_train.train dist=ddp|zero1|zero2|zero3|fsdp [...]

Trains a Falcon-H1 hybrid (attention + Mamba2) language model with learnable multipliers (LRM), or the muP baseline
with lrm=none, and writes checkpoints, metrics.jsonl and an offline W&B run into train.run_dir (runs/<experiment.name>).
A run resumes from its newest checkpoint (train.resume=auto). --cfg prints the composed config and exits.
--config-dir RUN_DIR relaunches a run with the config.yaml it saved (no overrides to retype); key=value changes it.
--estimate prints each engine's per-rank memory for this config (weights, gradients, optimizer state, activations with
and without train.activation_checkpointing) at the launcher's world size, or at each N of --estimate=N,..., and exits;
dist.device=cuda estimates a GPU run from a machine without one.

Examples:
  python -m lrm_train.train                                   # the default job: tiny model, LRM, Shakespeare, CPU
  python -m lrm_train.train lrm=none optim=muon train.max_steps=1000 experiment.name=mup_muon
  python -m lrm_train.train data=local_text data.source=/path/to/texts model.vocab_size=16384 data.vocab_size=16384
  python -m lrm_train.train model=falcon_h1_0p5b data.seq_len=4096 dist.device=cuda --estimate=8,64
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--cfg" in argv and argv[argv.index("--cfg") + 1 : argv.index("--cfg") + 2] == ["job"]:
        argv.pop(argv.index("--cfg") + 1)  # Hydra's own spelling, `--cfg job`: the same composed config
    saved = _pop_value(argv, "--config-dir")
    if saved is not None:  # a run directory, or the config file itself
        compose_run = partial(
            compose, saved=Path(saved) if saved.endswith((".yaml", ".yml")) else Path(saved) / "config.yaml"
        )
    else:
        compose_run = compose
    try:
        world_sizes = _estimate_world_sizes(argv)
    except ValueError as e:
        stderr_line(f"error: {e}")
        return BAD_INPUT
    work = partial(_train, world_sizes=world_sizes)
    return run_command(argv, help_text("train", USAGE), compose_run, work, flags=("--cfg", "--estimate"))


def _estimate_world_sizes(argv: list[str]) -> list[int]:
    """The world sizes of ``--estimate=N,...`` (left in ``argv`` as ``--estimate``), else the launcher's."""
    for i, arg in enumerate(argv):
        if arg.startswith("--estimate="):
            argv[i] = "--estimate"
            value = arg.split("=", 1)[1]
            try:
                sizes = [int(n) for n in value.split(",")]
            except ValueError:
                sizes = []
            if not sizes or min(sizes) < 1:
                raise ValueError(f"--estimate={value}: give world sizes as positive integers, e.g. --estimate=8,64")
            return sizes
    return [launched_world_size()]


def _pop_value(argv: list[str], option: str) -> str | None:
    """Remove ``option VALUE`` or ``option=VALUE`` from ``argv`` and return VALUE."""
    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv):
            del argv[i]
            return argv.pop(i)
        if arg.startswith(option + "="):
            del argv[i]
            return arg.split("=", 1)[1]
    return None


def _train(cfg: RunConfig, flags: list[str], world_sizes: list[int]) -> None:
    if "--estimate" in flags:
        print(format_estimate(cfg, world_sizes))
        return
    if flags:  # --cfg
        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        return
    try:
        train(cfg)
    except KeyboardInterrupt:  # the loop turns one during training into Interrupted, saying what was kept
        raise Interrupted("interrupted before training started; no checkpoint was written") from None


if __name__ == "__main__":
    status = main()
    if "RANK" in os.environ:  # a launched rank: everything is saved and closed by now
        exit_without_shutdown(status)
    sys.exit(status)
