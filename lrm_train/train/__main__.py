"""``python -m lrm_train.train [overrides]`` and ``torchrun --nproc_per_node=N -m lrm_train.train [overrides]``.

Trains a Falcon-H1 hybrid language model with learnable multipliers (or the muP baseline, lrm=none) on one process,
under DDP or DeepSpeed ZeRO; resumes the run directory's newest checkpoint by default.
"""

from __future__ import annotations

import sys

from omegaconf import OmegaConf

from lrm_train.config_compose import help_text
from lrm_train.train.config import compose
from lrm_train.train.loop import CallbackFailed, Interrupted, train
from lrm_train.train.preemption import Stopped
from lrm_train.utils import stderr_line

USAGE = """usage: python -m lrm_train.train [group=option ...] [key=value ...] [--cfg]
       torchrun --nproc_per_node=N -m lrm_train.train dist=ddp|zero1|zero2|zero3 [...]

Trains a Falcon-H1 hybrid (attention + Mamba2) language model with learnable multipliers (LRM), or the muP baseline
with lrm=none, and writes checkpoints, metrics.jsonl and an offline W&B run into train.run_dir (runs/<experiment.name>).
A run resumes from its newest checkpoint (train.resume=auto). --cfg prints the composed config and exits.

Examples:
  python -m lrm_train.train                                   # the default job: tiny model, LRM, Shakespeare, CPU
  python -m lrm_train.train lrm=none optim=muon train.max_steps=1000 experiment.name=mup_muon
  python -m lrm_train.train data=local_text data.source=/path/to/texts model.vocab_size=16384 data.vocab_size=16384
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(help_text("train", USAGE))
        return 0
    flags = [a for a in argv if a.startswith("-")]
    if flags and flags != ["--cfg"]:
        stderr_line(f"error: unknown option {next(f for f in flags if f != '--cfg')!r} (see --help)")
        return 2
    try:
        cfg = compose([a for a in argv if not a.startswith("-")])
    except ValueError as e:
        stderr_line(f"error: config: {e}")
        return 2
    if flags:
        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        return 0
    try:
        train(cfg)
    except Stopped as e:
        stderr_line(f"stopped: {e}")
        return e.exit_code
    except Interrupted as e:
        stderr_line(f"error: {e}")
        return 130
    except KeyboardInterrupt:
        stderr_line("error: interrupted before training started; no checkpoint was written")
        return 130
    except (ValueError, FileNotFoundError, OSError, CallbackFailed) as e:
        stderr_line(f"error: {e}")
        return 2
    except RuntimeError as e:
        stderr_line(f"error: {e}")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
