#!/usr/bin/env bash
# DeepSpeed's launcher, for the ZeRO engines (dist=zero1|zero2|zero3).
#   NUM_GPUS=8 bash launch/deepspeed.sh dist=zero2 experiment.name=run1              # this node
#   HOSTFILE=launch/hostfile.example bash launch/deepspeed.sh dist=zero3 ...         # every host of a hostfile
# A hostfile has one "hostname slots=<processes>" line per node; the launcher reaches them with pdsh/ssh, and
# train.run_dir must be on storage they all see. --no_local_rank: we read LOCAL_RANK from the environment.
set -euo pipefail
source "$(dirname "$0")/env.sh"
launcher=($DEEPSPEED)
if [[ -n "${HOSTFILE:-}" ]]; then
  exec "${launcher[@]}" --hostfile="$HOSTFILE" --master_port="${MASTER_PORT:-29500}" \
    --no_local_rank --module lrm_train.train "$@"
fi
if [[ -z "${NUM_GPUS:-}" ]]; then
  NUM_GPUS=$($PYTHON -c "import torch; print(torch.cuda.device_count() or 1)" 2>/dev/null || echo 1)
fi
exec "${launcher[@]}" --num_gpus="$NUM_GPUS" --master_port="${MASTER_PORT:-29500}" \
  --no_local_rank --module lrm_train.train "$@"
