# Sourced by every launcher: the project's own Python (its .venv, which `make install` made) unless PYTHON names
# another, the launchers built on it, and the offline defaults `make` uses (export a value to override any of them).
project_root=${LRM_TRAIN_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$project_root/.venv/bin/python" ]]; then PYTHON="$project_root/.venv/bin/python"; else PYTHON=python3; fi
fi
TORCHRUN=${TORCHRUN:-"$PYTHON -m torch.distributed.run"}
DEEPSPEED=${DEEPSPEED:-"$PYTHON -m deepspeed.launcher.runner"}
export PYTHON TORCHRUN DEEPSPEED
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1} WANDB_MODE=${WANDB_MODE:-offline}
