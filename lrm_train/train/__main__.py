"""``python -m lrm_train.train [overrides]`` and ``torchrun --nproc_per_node=N -m lrm_train.train [overrides]``.

Trains a Falcon-H1 hybrid language model with learnable multipliers (or the muP baseline, lrm=none) on one process,
under DDP or DeepSpeed ZeRO; resumes the run directory's newest checkpoint by default.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

from omegaconf import OmegaConf

from lrm_train.cli import run_command
from lrm_train.config_compose import help_text
from lrm_train.train.config import RunConfig, compose
from lrm_train.train.loop import Interrupted, train

USAGE = """usage: python -m lrm_train.train [group=option ...] [key=value ...] [--cfg]
       python -m lrm_train.train --config-dir RUN_DIR [key=value ...]
       torchrun --nproc_per_node=N -m lrm_train.train dist=ddp|zero1|zero2|zero3|fsdp [...]

Trains a Falcon-H1 hybrid (attention + Mamba2) language model with learnable multipliers (LRM), or the muP baseline
with lrm=none, and writes checkpoints, metrics.jsonl and an offline W&B run into train.run_dir (runs/<experiment.name>).
A run resumes from its newest checkpoint (train.resume=auto). --cfg prints the composed config and exits.
--config-dir RUN_DIR relaunches a run with the config.yaml it saved (no overrides to retype); key=value changes it.

Examples:
  python -m lrm_train.train                                   # the default job: tiny model, LRM, Shakespeare, CPU
  python -m lrm_train.train lrm=none optim=muon train.max_steps=1000 experiment.name=mup_muon
  python -m lrm_train.train data=local_text data.source=/path/to/texts model.vocab_size=16384 data.vocab_size=16384
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
    return run_command(argv, help_text("train", USAGE), compose_run, _train, flags=("--cfg",))


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


def _train(cfg: RunConfig, flags: list[str]) -> None:
    if flags:  # --cfg
        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        return
    try:
        train(cfg)
    except KeyboardInterrupt:  # the loop turns one during training into Interrupted, saying what was kept
        raise Interrupted("interrupted before training started; no checkpoint was written") from None


if __name__ == "__main__":
    sys.exit(main())
