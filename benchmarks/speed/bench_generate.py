"""Generation speed: the mixture's `generate` (route the prompt, then HF generate with a KV cache on the
one chosen expert) against plain HF `generate` of that same expert, interleaved prompt by prompt; also the
routing step alone, and one request through the serving engine's own decode loop (serving/batching.py).

Prompts are the first --prompt-tokens tokens of a seeded sample of test sequences; greedy decoding of
exactly --new-tokens tokens (min_new_tokens = max_new_tokens) on both sides, so both produce the same
tokens and the difference is the routing step and the wrapper. Target (issue 14): routing adds < 5% at
64 new tokens. Also times one `smalltalk generate` process (load + route + generate) for reference.

  python benchmarks/speed/bench_generate.py --run runs/demo [--prompts 24] [--new-tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from smalltalk.data.shards import SplitData
from smalltalk.mixture.model import SmallTalkMixture


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    mixture = SmallTalkMixture.from_pretrained(run)
    test = SplitData(run / "data", "test")
    tok = mixture.tokenizer
    prompts = [tok.decode(row[:args.prompt_tokens]) for row in test.batch(test.sample(args.prompts))]
    options = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False}
    for k in range(mixture.num_experts):
        mixture.expert(k)  # load every expert before timing
    mixture.generate(prompts[0], **options)  # warm-up
    from smalltalk.serving.batching import BatchedEngine

    engine = BatchedEngine(mixture, "bench", args.new_tokens)
    mixed, plain, served, routing, same = [], [], [], [], 0
    for i, prompt in enumerate(prompts):  # alternate which side goes first: no order effect
        ids = tok(prompt, return_tensors="pt").input_ids
        start = time.perf_counter()
        expert = int(mixture.route(ids)[0][0])
        routing.append(time.perf_counter() - start)
        start = time.perf_counter()
        req = engine.validate({"prompt": prompt, "max_tokens": args.new_tokens, "temperature": 0}, chat=False)
        _, _, n_served = engine.generate(req, engine.route(req))
        served.append((time.perf_counter() - start) * args.new_tokens / n_served)  # per 64 tokens if it stopped
        for side in ((0, 1) if i % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            if side == 0:
                result = mixture.generate(prompt, **options)
                mixed.append(time.perf_counter() - start)
            else:
                out = mixture.expert(expert).generate(ids, pad_token_id=tok.eos_token_id, **options)
                plain.append(time.perf_counter() - start)
        same += tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == result["text"]
    m, p = statistics.median(mixed), statistics.median(plain)
    print(f"{run}: {mixture.num_experts} experts, prompts of {args.prompt_tokens} tokens, {args.new_tokens} new "
          f"tokens, greedy, {args.threads} threads, medians over {len(prompts)} prompts")
    print("| path | s per request | new tokens/s |\n|---|---|---|")
    print(f"| mixture.generate (route + expert) | {m:.3f} | {args.new_tokens / m:,.0f} |")
    print(f"| HF generate, same expert | {p:.3f} | {args.new_tokens / p:,.0f} |")
    b = statistics.median(served)
    print(f"| serving engine (`serve`'s batching loop), one request alone | {b:.3f} | {args.new_tokens / b:,.0f} |")
    overhead = m / p - 1
    r = statistics.median(routing)
    print(f"routing step alone: {r * 1e3:.2f} ms = {r / p:.1%} of the request")
    print(f"routing + wrapper overhead: {overhead:+.1%} (target < 5%: {'met' if overhead < 0.05 else 'MISSED'}); "
          f"same text on {same}/{len(prompts)} prompts")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "smalltalk.cli", "generate", "--run", str(run), prompts[0],
                    "--max-new-tokens", str(args.new_tokens)], check=True, stdout=subprocess.DEVNULL)
    print(f"one `smalltalk generate` process (start-up, load, route, generate): {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
