#!/usr/bin/env bash
# One node, one process per GPU (or NPROC processes on CPU, gloo), DDP.
#   bash launch/torchrun_single_node.sh [hydra overrides...]
#   NPROC=2 bash launch/torchrun_single_node.sh experiment.name=ddp_test train.max_steps=100
set -euo pipefail
source "$(dirname "$0")/env.sh"
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$($PYTHON -c "import torch; print(torch.cuda.device_count() or 1)" 2>/dev/null || echo 1)
fi
exec $TORCHRUN --standalone --nproc_per_node="$NPROC" -m lrm_train.train dist=ddp "$@"
