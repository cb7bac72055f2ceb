#!/usr/bin/env bash
# The GPU benchmark (scripts/bench/gpu.py) in one prepared run of a few minutes on a machine with an
# NVIDIA GPU: parity against transformers in bf16 on CUDA, batch-1 decode of the 3B shape eager and
# under torch.compile, batch-32 throughput through the engine, a 2,048-token prefill, and achieved
# HBM bandwidth against the card's peak. Results: stdout and $OUT/gpu.json (OUT defaults to work/gpu).
# Without a visible CUDA GPU it exits with status 2 after one line saying so, having run nothing.
# Usage: scripts/bench/gpu.sh [gpu.py options...]
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "scripts/bench/gpu.sh: no NVIDIA GPU here (nvidia-smi missing or lists no device); nothing was run" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv
OUT="${OUT:-work/gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout 480 python scripts/bench/gpu.py --output "$OUT/gpu.json" "$@"
