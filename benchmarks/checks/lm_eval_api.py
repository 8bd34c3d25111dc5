"""lm-evaluation-harness against a served mixture (`local-completions`) and in-process (`smalltalk eval
downstream`), on the same local multiple-choice task built from the run's own validation split.

The task: --items validation sequences drawn by the split's seeded order; the context is the text of their
first --context tokens, the right choice the text of the next --continuation tokens, the three wrong ones
the continuations of three other sampled sequences. The server routes each request on its whole token
sequence (context + continuation), the in-process model on the context, so the two may differ on a few
items; both print their accuracy and wall time. `--hf`: also lm-eval's own `hf` model on the run's Hugging Face
export (`smalltalk export`), with the largest log-likelihood difference to the in-process model.

  python benchmarks/checks/lm_eval_api.py --run runs/demo [--items 100] [--context 32] [--continuation 16] [--hf]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "speed"))
from bench_serve import start  # noqa: E402

from smalltalk.data.shards import SplitData
from smalltalk.evaluation.lm_harness import evaluate_downstream
from smalltalk.mixture.model import SmallTalkMixture

TASK = """task: smalltalk_api_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
"""


def write_task(run: Path, out: Path, items: int, context: int, continuation: int) -> Path:
    tokenizer = SmallTalkMixture.from_pretrained(run).tokenizer
    data = SplitData(run / "data", "validation")
    ids = data.sample(items)
    texts = [(tokenizer.decode(data[i][:context].tolist()),
              tokenizer.decode(data[i][context:context + continuation].tolist())) for i in ids]
    rng = random.Random(0)
    docs = []
    for k, (ctx, right) in enumerate(texts):
        wrong = [texts[j][1] for j in rng.sample([j for j in range(len(texts)) if j != k], 3)]
        choices = [right, *wrong]
        rng.shuffle(choices)
        docs.append({"context": ctx, "choices": choices, "gold": choices.index(right)})
    (out / "mc.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    (out / "task.yaml").write_text(TASK.format(data=out / "mc.jsonl"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--context", type=int, default=32)
    ap.add_argument("--continuation", type=int, default=16)
    ap.add_argument("--hf", action="store_true", help="also lm-eval's `hf` model on the run's Hugging Face export")
    args = ap.parse_args()
    run = Path(args.run)
    tasks = write_task(run, Path(tempfile.mkdtemp()), args.items, args.context, args.continuation)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "OPENAI_API_KEY": "unused"}
    proc, base = start(str(run), None)
    try:
        wall = time.perf_counter()
        out = tasks / "api"
        done = subprocess.run(
            [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
             f"base_url={base}/v1/completions,model=smalltalk,tokenizer_backend=huggingface,"
             f"tokenizer={run / 'tokenizer'},num_concurrent=4,max_retries=1,max_length=256",
             "--tasks", "smalltalk_api_mc", "--include_path", str(tasks), "--output_path", str(out)],
            capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(done.stderr[-3000:])
            return 1
        api_wall = time.perf_counter() - wall
        (path,) = out.rglob("results_*.json")
        api = json.loads(path.read_text())["results"]["smalltalk_api_mc"]["acc,none"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    wall = time.perf_counter()
    local_run = evaluate_downstream(str(run), ["smalltalk_api_mc"], str(tasks))
    local = local_run["results"]["smalltalk_api_mc"]["acc,none"]
    local_wall = time.perf_counter() - wall
    hf_line = None
    if args.hf:  # lm-eval's own `hf` model on the Hugging Face export of the run
        from smalltalk.layout import RunLayout
        from smalltalk.mixture.export import export_mixture

        export = export_mixture(RunLayout(run), tasks / "hf-export")
        wall = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
             f"pretrained={export},trust_remote_code=True,dtype=float32", "--device", "cpu", "--batch_size", "1",
             "--tasks", "smalltalk_api_mc", "--include_path", str(tasks), "--output_path", str(tasks / "hf"),
             "--log_samples"], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(done.stderr[-3000:])
            return 1
        hf_wall = time.perf_counter() - wall
        (path,) = (tasks / "hf").rglob("results_*.json")
        hf = json.loads(path.read_text())["results"]["smalltalk_api_mc"]["acc,none"]
        (path,) = (tasks / "hf").rglob("samples_smalltalk_api_mc_*.jsonl")
        theirs = {s["doc_id"]: s for s in map(json.loads, path.read_text().splitlines())}
        gap = max(abs(float(a[0][0]) - float(b[0][0])) for s in local_run["samples"]["smalltalk_api_mc"]
                  for a, b in zip(s["resps"], theirs[s["doc_id"]]["resps"], strict=True))
        hf_line = (f"lm-eval --model hf on the HF export:         acc {hf:.3f} ({hf_wall:.0f} s); largest "
                   f"log-likelihood difference to in process {gap:.1e}")
    print(f"{args.items} items, 4 choices, context {args.context} tokens, continuation {args.continuation}")
    print(f"local-completions against `smalltalk serve`: acc {api:.3f} ({api_wall:.0f} s)")
    print(f"`smalltalk eval downstream` (in process):     acc {local:.3f} ({local_wall:.0f} s)")
    print(f"difference: {abs(api - local) * args.items:.0f} item(s)")
    if hf_line:
        print(hf_line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
