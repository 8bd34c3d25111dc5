"""The Hugging Face export (issue #42): export time, and generation speed of the exported model against the
routed experts' own `generate`, side by side in one run (medians).

Batch 1: each prompt through `model.generate` of the export vs its routed expert's own `generate`. Batch 8:
eight prompts (left padded) through the export at once vs each expert's own `generate` on the rows routed to
it (the sum of those calls). Greedy, exactly --new-tokens new tokens on both sides. Prompts: the first
--prompt-tokens tokens of a seeded sample of validation sequences. Targets: export under 10 s; the export's
tokens/s at least half the experts' own at batch 1 and 8.

  python benchmarks/speed/bench_hf.py --run runs/demo [--prompts 16] [--new-tokens 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from smalltalk.data.shards import SplitData
from smalltalk.layout import RunLayout
from smalltalk.mixture.export import export_mixture


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    run = RunLayout(Path(args.run))
    with tempfile.TemporaryDirectory() as tmp:
        exports = [_timed(lambda i=i: export_mixture(run, Path(tmp) / str(i))) for i in range(3)]
        model = AutoModelForCausalLM.from_pretrained(str(Path(tmp) / "0"), trust_remote_code=True).eval()
    data = SplitData(run.data, "validation")
    prompts = torch.from_numpy(data.batch(data.sample(args.prompts))[:, :args.prompt_tokens]).long()
    options = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False,
               "pad_token_id": 0}
    with torch.inference_mode():
        routed = model(input_ids=prompts).routed_experts[:, 0]
        model.generate(input_ids=prompts[:1], **options)  # warm-up
        ours, theirs = {1: [], 8: []}, {1: [], 8: []}
        for i in range(len(prompts)):
            x = prompts[i:i + 1]
            ours[1].append(_timed(lambda x=x: model.generate(input_ids=x, **options)))
            theirs[1].append(_timed(lambda x=x, i=i: model.experts[int(routed[i])].generate(input_ids=x, **options)))
        for start in range(0, len(prompts) - 7, 8):
            rows = slice(start, start + 8)
            ours[8].append(_timed(lambda rows=rows: model.generate(input_ids=prompts[rows], **options)))
            experts = routed[rows]
            theirs[8].append(sum(_timed(lambda e=e, rows=rows, experts=experts: model.experts[e].generate(
                input_ids=prompts[rows][experts == e], **options)) for e in torch.unique(experts).tolist()))
    print(f"export (hf) of {run.root}: median {statistics.median(exports):.2f} s over 3 (target < 10 s)")
    print("| batch | export tokens/s | routed experts' own generate tokens/s | ratio (target >= 0.5) |")
    print("|---|---|---|---|")
    for batch in (1, 8):
        tokens = batch * args.new_tokens
        a, b = tokens / statistics.median(ours[batch]), tokens / statistics.median(theirs[batch])
        print(f"| {batch} | {a:.0f} | {b:.0f} | {a / b:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
