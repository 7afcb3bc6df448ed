#!/usr/bin/env bash
# Several nodes without SLURM: run this once on every node, with the same RDZV_ENDPOINT
# (node 0's address and a free port) and RDZV_ID, and each node's own NODE_RANK:
#
#   node 0:  NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=node0:29500 bash launch/multi_node.sh configs/digits.yaml
#   node 1:  NNODES=2 NODE_RANK=1 RDZV_ENDPOINT=node0:29500 bash launch/multi_node.sh configs/digits.yaml
#
# which runs:  dist-train launch CONFIG --nnodes $NNODES --node-rank $NODE_RANK \
#                --rdzv-endpoint $RDZV_ENDPOINT --rdzv-id ${RDZV_ID:-dist_train} --nproc-per-node ${NPROC:-auto}
# The run directory (run.output_dir) must be on a filesystem every node sees.
set -euo pipefail
: "${NNODES:?set NNODES to the number of nodes}"
: "${NODE_RANK:?set NODE_RANK to this node's index, 0..NNODES-1}"
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT to node 0's HOST:PORT}"
if [ $# -lt 1 ]; then
  echo "usage: NNODES=N NODE_RANK=R RDZV_ENDPOINT=HOST:PORT $0 CONFIG [key=value ...]" >&2
  exit 2
fi
config=$1
shift
exec "${PYTHON:-python}" -m dist_train.cli launch "$config" --nnodes "$NNODES" --node-rank "$NODE_RANK" \
  --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-dist_train}" --nproc-per-node "${NPROC:-auto}" \
  --max-restarts "${MAX_RESTARTS:-0}" "$@"
