#!/usr/bin/env bash
# Several nodes without SLURM: run this once on every node, with the same RDZV_ENDPOINT
# (node 0's address and a free port) and RDZV_ID, and each node's own NODE_RANK:
#
#   node 0:  NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=node0:29500 bash launch/multi_node.sh configs/digits.yaml
#   node 1:  NNODES=2 NODE_RANK=1 RDZV_ENDPOINT=node0:29500 bash launch/multi_node.sh configs/digits.yaml
#   (add SOCKET_IFNAME=eth0 on every node if its host name resolves to 127.x, see below)
#
# which runs:  dist-train launch CONFIG --nnodes $NNODES --node-rank $NODE_RANK \
#                --rdzv-endpoint $RDZV_ENDPOINT --rdzv-id ${RDZV_ID:-dist_train} --nproc-per-node ${NPROC:-auto}
# The run directory (run.output_dir) must be on a filesystem every node sees.
# Gloo (the stop-signal group) and NCCL bind to the address the host name resolves to, a
# loopback one on stock Ubuntu/Debian (127.0.1.1): SOCKET_IFNAME=eth0 (the interface the nodes
# share) sets GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME, unless they are set already.
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
if [ -n "${SOCKET_IFNAME:-}" ]; then
  export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$SOCKET_IFNAME} NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$SOCKET_IFNAME}
fi
exec "${PYTHON:-python}" -m dist_train.cli launch "$config" --nnodes "$NNODES" --node-rank "$NODE_RANK" \
  --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-dist_train}" --nproc-per-node "${NPROC:-auto}" \
  --max-restarts "${MAX_RESTARTS:-0}" "$@"
