#!/bin/bash
# Two nodes by hand: run this on each node with NODE_RANK=0 or 1 and HEAD=<the first node's address>.
# On one machine (two "nodes" on loopback, one process each): HEAD=127.0.0.1 NODE_RANK=0 ./run.sh & NODE_RANK=1 ...
set -euo pipefail
HEAD=${HEAD:-127.0.0.1}
PORT=${PORT:-29500}
RECIPE=${RECIPE:-recipes/classification/minilm-topics.yaml}
# finetune's own flags:
finetune run "$RECIPE" --nnodes 2 --node-rank "${NODE_RANK:?set NODE_RANK}" --rdzv-endpoint "$HEAD:$PORT" \
  --num-processes "${NPROC:-1}"
# The same through torchrun (finetune then starts no processes of its own):
#   torchrun --nnodes 2 --nproc-per-node "${NPROC:-1}" --node-rank "$NODE_RANK" --master-addr "$HEAD" \
#     --master-port "$PORT" -m finetune run "$RECIPE"
