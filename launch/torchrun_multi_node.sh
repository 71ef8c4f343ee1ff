#!/usr/bin/env bash
# Several nodes: run this same command on every node (rendezvous through MASTER_ADDR:MASTER_PORT).
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=node0 MASTER_PORT=29500 NPROC_PER_NODE=8 \
#     bash launch/torchrun_multi_node.sh experiment.name=big_run
# train.run_dir must be on storage every node sees (checkpoints, metrics and logs are shared).
set -euo pipefail
source "$(dirname "$0")/env.sh"
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
MASTER_PORT=${MASTER_PORT:-29500}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
RDZV_ID=${RDZV_ID:-lrm_train}
exec $TORCHRUN --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC_PER_NODE" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$RDZV_ID" \
  -m lrm_train.train dist=ddp "$@"
