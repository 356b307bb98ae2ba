#!/usr/bin/env bash
# CUDA benchmarks in bf16 (autocast): the same table as `python -m benchmarks.run_all` (ours vs the
# official decoder, same weights and inputs), plus full-model images/second for an everything pass
# and a training step at 1024 px with a 32x32 grid. Budget: well under 8 minutes on one GPU.
#
#   bash benchmarks/gpu.sh            # from anywhere; runs from the repo root
#   PYTHON=/path/to/python OUT=results.json bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python}"
OUT="${OUT:-experiments/benchmarks/gpu_$(date +%Y%m%d_%H%M%S).json}"
mkdir -p "$(dirname "$OUT")"

"$PY" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("benchmarks/gpu.sh: CUDA is not available to this python")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, bf16 supported: {torch.cuda.is_bf16_supported()}")
PY
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# Hard stop at 7.5 minutes, so a hang cannot eat the machine.
timeout 450 "$PY" -m benchmarks.run_all --device cuda --dtype bf16 --throughput --out "$OUT"
