#!/usr/bin/env bash
# Pre-training throughput of a ~1B model on one GPU (H100/H200, torch >= 2.11): 50 steps,
# tokens/s and MFU as JSON. Needs only torch, numpy, safetensors, tokenizers, jinja2 beside
# the source tree (no install). Options go to benchmarks/gpu_train.py (--help).
# Without activation checkpointing first; if that runs out of memory, again with it.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$PY" benchmarks/gpu_train.py "$@"
status=$?
if [ "$status" -eq 3 ]; then
  echo "out of memory: retrying with activation checkpointing" >&2
  "$PY" benchmarks/gpu_train.py --activation-checkpointing "$@"
  status=$?
fi
exit "$status"
