#!/usr/bin/env bash
# The GPU figures in one prepared call, under 8 minutes on one H200 (each step has its own hard stop):
#   1. benchmarks.gpu_checks: segment images/s at 32x32 on 1024-px photos vs the reference AMG on the
#      same GPU (ours fp32 TF32-off, bf16, bf16 + torch.compile'd decoder), fp32 parity with TF32 off
#      (count, paired IoU, score differences), bf16 drift, the full-recipe training step (1024 px,
#      32x32 grid, 3 masks, bf16, activation checkpointing) images/s and peak GPU memory;
#   2. benchmarks.run_all in bf16: the decoder / train-step / matching table against the official
#      decoder, plus full-model images/s.
#
#   bash benchmarks/gpu.sh            # from anywhere; runs from the repo root
#   PYTHON=/path/to/python OUT_DIR=experiments/benchmarks bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python}"
STAMP="$(date +%Y%m%d_%H%M%S)"
OUT_DIR="${OUT_DIR:-experiments/benchmarks}"
mkdir -p "$OUT_DIR"

"$PY" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("benchmarks/gpu.sh: CUDA is not available to this python")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, bf16 supported: {torch.cuda.is_bf16_supported()}")
PY
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

status=0
# 1: about 4 minutes (model builds, two photos x 4 generators x 3 reps, one compile, 4 training steps)
timeout 270 "$PY" -m benchmarks.gpu_checks --device cuda --out "$OUT_DIR/gpu_checks_$STAMP.json" || status=$?
# 2: the rest of the budget
timeout 180 "$PY" -m benchmarks.run_all --device cuda --dtype bf16 --throughput --out "$OUT_DIR/gpu_$STAMP.json" || status=$?
exit $status
