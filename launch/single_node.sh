#!/usr/bin/env bash
# One node, all its GPUs (or one process on CPU):
#
#   bash launch/single_node.sh configs/digits.yaml [key=value ...]
#   NPROC=2 bash launch/single_node.sh configs/digits.yaml optim.lr=0.1     # 2 workers
#
# which runs:  dist-train launch CONFIG --nproc-per-node ${NPROC:-auto} [key=value ...]
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: [NPROC=N] $0 CONFIG [key=value ...]" >&2
  exit 2
fi
config=$1
shift
exec "${PYTHON:-python}" -m dist_train.cli launch "$config" --nproc-per-node "${NPROC:-auto}" \
  --max-restarts "${MAX_RESTARTS:-0}" "$@"
