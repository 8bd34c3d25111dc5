#!/usr/bin/env bash
# GPU check (~5 minutes on one H200: train ~2.5, scoring ~1.5, pipeline 1.2, parts 0.8), in sections that
# each report ok/FAILED so one failure does not hide the rest:
#   1. train:    the paper-335m preset through the real trainer, bf16 autocast + torch.compile, random tokens
#                (vocab 32k, seq 1024): tokens/s and MFU against the card's dense bf16 peak.
#   2. scoring:  the paper's 4.4M routers (E = 4 and 32, prefix 32 and 256) scoring prefixes on the GPU
#                under bf16 autocast, per-router loop and grouped forward: prefixes/s and achieved FLOP/s.
#   3. pipeline: the tiny pipeline end to end on the GPU in bf16 (EM routers, partition, experts, dense,
#                streaming eval, report), then generate; nvidia-smi lists every process that held the GPU.
#   4. parts:    partition again as 3 separate part jobs + a merge on the GPU: same bytes as in 3.
#   5. torchrun: partition under torchrun with 2 ranks (nccl) when there are >= 2 GPUs: same bytes.
#   6. serving:  the batching engine on the GPU (tiny run of 3): 24 concurrent seeded/greedy requests give
#                the texts they give alone (GPU kernels may round differently per batch size: counted),
#                greedy texts equal HF generate's.
#   7. sft:      `smalltalk sft` on the tiny run with the trainer on the GPU: jobs, dense baseline, results.
#   8. forward:  every training path training/paths.py can pick on the GPU (hf; liger when Liger-Kernel is
#                installed) vs HF's own loss (paper-335m, bf16 autocast, eager): loss and gradient
#                agreement, forward+backward time and tokens/s of each (~30 s). Section 1 trains by the
#                path `auto` picks there (its train_manifest.json records which).
#   9. export:   the tiny run, and a twin routed by count-based n-gram routers, exported in the Hugging Face layout
#                and loaded by transformers on the GPU in DTYPE: each routes validation prefixes as the package
#                does on the CPU (share printed; near-ties may flip under bf16 router LMs, never the n-gram
#                tables, which stay float32), and generates.
# Usage: bash benchmarks/checks/gpu_check.sh [PEAK_FLOPS]      (logs also under $OUT when that is set)
# Dry run on a CPU machine: DEVICE=cpu DTYPE=float32 SKIP=train,scoring bash benchmarks/checks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/../.."  # the repository root (this file lives in benchmarks/checks/)
PEAK=${1:-989e12}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
SKIP=${SKIP:-}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
"$PY" -c "import smalltalk" 2>/dev/null || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
LOGS=${OUT:-$(mktemp -d)}
TMP=$(mktemp -d)
declare -a RESULTS=()

section() {  # section NAME COMMAND...: run unless skipped, time it, record ok/FAILED
  local name=$1; shift
  if [[ ",$SKIP," == *",$name,"* ]]; then RESULTS+=("$name: skipped"); return; fi
  echo; echo "=== $name ==="
  local start=$SECONDS
  if "$@" 2>&1 | tee "$LOGS/$name.log"; then RESULTS+=("$name: ok ($((SECONDS - start)) s)")
  else RESULTS+=("$name: FAILED ($((SECONDS - start)) s, see $name.log)"); fi
}

train() {
  "$PY" benchmarks/speed/bench_train.py --presets paper-335m --vocab 32000 --seq-len 1024 --batch 8 --steps 36 \
    --device "$DEVICE" --dtype "$DTYPE" --compile --peak "$PEAK"
}

forward() {
  "$PY" benchmarks/speed/bench_training_forward.py --preset paper-335m --vocab 32000 --seq-len 1024 --batch 8 \
    --device "$DEVICE" --dtype "$DTYPE"
}

scoring() {  # ~90 s on an H200 (fp32 and 262k-token batches took > 4 minutes: docs/scaling.md has them)
  "$PY" benchmarks/speed/bench_routing.py --device "$DEVICE" --dtype "$DTYPE" --presets paper-router-4.4m \
    --vocab 32000 --experts 4 32 --batch-tokens 65536 --skip-partition
}

pipeline() {
  "$PY" -c "
import sys; sys.path.insert(0, '.')
from pathlib import Path
from tests.conftest import make_documents, write_jsonl
write_jsonl(Path('$TMP/docs.jsonl'), make_documents(240))" || return 1
  local on=(--set "train.device=$DEVICE" --set "routing.train.device=$DEVICE" --set "eval.device=$DEVICE"
            --set "train.dtype=$DTYPE" --set "routing.train.dtype=$DTYPE")
  "$PY" -m smalltalk.cli run --config configs/tiny.yaml --run "$TMP/run" --set "data.inputs=[$TMP/docs.jsonl]" \
    --set data.max_docs=null --set routing.experts=3 --set routing.chunk=240 --set routing.partition_chunk=32 \
    "${on[@]}" || return 1
  "$PY" -m smalltalk.cli generate --run "$TMP/run" "xyz_ {} = 1" --max-new-tokens 16 --device "$DEVICE" || return 1
  "$PY" -c "
import json; m = json.load(open('$TMP/run/partition/manifest.json')); print('partition:', m.get('dtype'), m['counts'])"
}

parts() {
  for k in 0 1 2; do
    "$PY" -m smalltalk.cli partition --run-dir "$TMP/run" --out "$TMP/partition-parts" --part "$k/3" || return 1
  done
  "$PY" -m smalltalk.cli partition --run-dir "$TMP/run" --out "$TMP/partition-parts" --merge || return 1
  same_partition "$TMP/partition-parts"
}

torchrun_partition() {
  if [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())')" -lt 2 ]; then
    echo "fewer than 2 GPUs: torchrun partition not run"; return 0
  fi
  "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m smalltalk.cli partition --run-dir "$TMP/run" \
    --out "$TMP/partition-2gpu" || return 1
  same_partition "$TMP/partition-2gpu"
}

serving() {
  "$PY" -c "
import threading
from smalltalk.mixture.model import SmallTalkMixture
from smalltalk.serving.batching import BatchedEngine
from smalltalk.serving.serial import SerialEngine
mixture = SmallTalkMixture.from_pretrained('$TMP/run', '$DEVICE')
batched, serial = BatchedEngine(mixture, 'x', 32), SerialEngine(mixture, 'x', 32)
prompts = ['xyz_ {} = %d' % i for i in range(12)] + ['etaoin shrdlu %d' % i for i in range(12)]
def go(engine, i):
    req = engine.validate({'prompt': prompts[i], 'max_tokens': 8 + i % 9, 'temperature': 0.8 if i % 2 else 0,
                           'seed': i}, False)
    routing = engine.route(req)
    return routing['expert'], engine.generate(req, routing)
alone, together = [go(batched, i) for i in range(24)], [None] * 24
threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, go(batched, i))) for i in range(24)]
[t.start() for t in threads]; [t.join() for t in threads]
same = sum(a == b for a, b in zip(alone, together))
hf = sum(go(serial, i) == alone[i] for i in range(0, 24, 2))
print(f'batched == alone: {same}/24 (peak rows {batched.peak_rows}); greedy == HF generate: {hf}/12')
assert same >= 20 and hf >= 10 and batched.peak_rows >= 2"
}

sft() {
  "$PY" -c "
import json, sys; sys.path.insert(0, '.')
from pathlib import Path
from tests.conftest import make_documents
out = Path('$TMP/sft-data'); out.mkdir()
rows = [{'prompt': ' '.join(d['text'].split()[:3]), 'completion': ' '.join(d['text'].split()[3:6]),
         'domain': d['domain']} for d in make_documents(150, seed=7)]
for split, part in (('train', rows[:120]), ('test', rows[120:])):
    (out / f'{split}.jsonl').write_text(''.join(json.dumps(r) + '\\n' for r in part))" || return 1
  "$PY" -m smalltalk.cli sft --run "$TMP/run" --data "$TMP/sft-data" --set "train.device=$DEVICE" \
    --set "train.dtype=$DTYPE" --set sft.micro_batch_size=8 --set sft.lr=3e-3
}

export_hf() {
  local on=(--set "train.device=$DEVICE" --set "routing.train.device=$DEVICE" --set "eval.device=$DEVICE")
  "$PY" -m smalltalk.cli run --config configs/tiny.yaml --run "$TMP/run-ngram" --set "data.inputs=[$TMP/docs.jsonl]" \
    --set data.max_docs=null --set routing.experts=3 --set routing.chunk=240 --set routing.method=ngram \
    --set sft.enabled=false "${on[@]}" > "$LOGS/export-ngram-run.log" || return 1
  for run in run run-ngram; do
    "$PY" -m smalltalk.cli export --run "$TMP/$run" --out "$TMP/hf-$run" || return 1
    "$PY" -c "
import numpy as np, torch
from transformers import AutoModelForCausalLM
from smalltalk.data.shards import SplitData
from smalltalk.mixture.model import SmallTalkMixture
model = AutoModelForCausalLM.from_pretrained('$TMP/hf-$run', trust_remote_code=True, dtype=torch.$DTYPE).to('$DEVICE')
x = SplitData('$TMP/$run/data', 'validation').batch(np.arange(64), 16)
ids = torch.from_numpy(x).to('$DEVICE')
with torch.no_grad():
    experts = model.route(ids, torch.ones_like(ids))[0][:, 0].cpu().numpy()
chosen, _ = SmallTalkMixture.from_pretrained('$TMP/$run').route(x, 16)
same = float((experts == chosen).mean())
out = model.generate(input_ids=ids[:4], attention_mask=torch.ones_like(ids[:4]), max_new_tokens=8, do_sample=False)
print(f'$run: {model.config.router_method} routers, routed as the package on {same:.0%} of 64 prefixes; '
      f'generated {out.shape[1] - 16} tokens on', out.device)
assert same >= (1.0 if model.config.router_method == 'ngram' else 0.9)" || return 1
  done
}

same_partition() {  # every expert's share file byte-identical to the pipeline's partition
  local status=0
  for f in "$TMP"/run/partition/expert_*.npy; do
    cmp "$f" "$1/$(basename "$f")" || status=1
  done
  [ $status -eq 0 ] && echo "$1: byte-identical to RUN/partition"
  return $status
}

echo "root $PWD; device $DEVICE, dtype $DTYPE; $("$PY" -c "import torch; print('torch', torch.__version__,
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')")"
if [ "$DEVICE" != cpu ] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader -lms 500 > "$LOGS/gpu_apps.csv" 2>&1 &
  SMI=$!
fi
section train train
section scoring scoring
section pipeline pipeline
section parts parts
section torchrun torchrun_partition
section serving serving
section sft sft
section forward forward
section export export_hf
if [ -n "${SMI:-}" ]; then
  kill "$SMI" 2>/dev/null
  echo; echo "processes that held the GPU: $(cut -d, -f1 "$LOGS/gpu_apps.csv" | sort -u | grep -c '^[0-9]')"
fi
echo; printf '%s\n' "${RESULTS[@]}" | tee "$LOGS/summary.txt"
! grep -q FAILED "$LOGS/summary.txt"
