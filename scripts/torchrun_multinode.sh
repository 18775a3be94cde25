#!/usr/bin/env bash
# One node of a multi-node run: start this on every node with the same MASTER_ADDR and a distinct NODE_RANK.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash scripts/torchrun_multinode.sh configs/llama2-7b-longlora-100k.yaml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 bash scripts/torchrun_multinode.sh configs/llama2-7b-longlora-100k.yaml
# Extra arguments after the config are dotted overrides. GPUS_PER_NODE defaults to the visible GPU count.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: torchrun_multinode.sh CONFIG.yaml [key=value ...]}; shift
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
GPUS_PER_NODE=${GPUS_PER_NODE:-$(.venv/bin/python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
exec .venv/bin/torchrun \
  --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id "${RDZV_ID:-longctx}" \
  train.py "$CONFIG" "$@"
