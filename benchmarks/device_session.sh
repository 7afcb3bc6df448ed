#!/usr/bin/env bash
# One session on a lent GPU machine (one H200, torch 2.11, no wandb, no network), from the work
# tree: every check of benchmarks/gpu_check.py, riskiest first, each in its own time box, all
# within 9 minutes. Writes OUT/results.json (every check so far), OUT/checks.tar.gz (one JSON and
# one log per check), OUT/environment.json and the whole session's output in OUT/session.log.
#
#   bash benchmarks/device_session.sh                 # on the GPU machine; OUT defaults to device_out
#   bash benchmarks/device_session.sh --smoke         # the same checks on a CPU, tiny (CI: under 2 minutes)
#   bash benchmarks/device_session.sh --only fsdp_sgd ddp_2_ranks
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-device_out}"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
"${PYTHON:-python3}" benchmarks/gpu_check.py --out-dir "$OUT" "$@" 2>&1 | tee "$OUT/session.log"
exit "${PIPESTATUS[0]}"
