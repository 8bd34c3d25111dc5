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

# The tiny pipeline end to end on CUDA: every stage on the GPU (routers' EM and scoring, partition, experts,
# dense, streaming eval), then generate; partition again under torchrun when there are >= 2 GPUs.
TMP=$(mktemp -d)
"$PY" -c "
import sys; sys.path.insert(0, '.')
from pathlib import Path
from tests.conftest import make_documents, write_jsonl
write_jsonl(Path('$TMP/docs.jsonl'), make_documents(240))"
CUDA=(--set train.device=cuda --set routing.train.device=cuda --set eval.device=cuda --set train.dtype=bfloat16)
"$PY" -m smalltalk.cli run --config configs/tiny.yaml --run "$TMP/run" --set "data.inputs=[$TMP/docs.jsonl]" \
  --set data.max_docs=null --set routing.experts=3 --set routing.chunk=240 "${CUDA[@]}"
"$PY" -m smalltalk.cli generate --run "$TMP/run" "xyz_ {} = 1" --max-new-tokens 16 --device cuda
if [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  "$(dirname "$PY")/torchrun" --standalone --nproc_per_node 2 -m smalltalk.cli partition --run-dir "$TMP/run" \
    --out "$TMP/partition-2gpu"
  cmp "$TMP/partition-2gpu/expert_00.npy" "$TMP/run/partition/expert_00.npy" || echo "2-GPU partition differs"
fi
echo "tiny pipeline on CUDA: ok"
