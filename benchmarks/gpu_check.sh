#!/usr/bin/env bash
# GPU readiness check (<= 8 minutes on one H100/H200): trains the paper-335m preset for a few dozen steps
# through the real trainer with bf16 autocast and torch.compile on random tokens (vocab 32k, seq 1024), and
# prints tokens/s and MFU against the card's dense bf16 peak (989 TFLOP/s for H100/H200 SXM).
# Usage: bash benchmarks/gpu_check.sh [PEAK_FLOPS]
set -euo pipefail
cd "$(dirname "$0")/.."
PEAK=${1:-989e12}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
"$PY" benchmarks/bench_train.py --presets paper-335m --vocab 32000 --seq-len 1024 --batch 8 --steps 36 \
  --device cuda --dtype bfloat16 --compile --peak "$PEAK"
