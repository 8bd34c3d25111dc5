"""Short prompts: continuation perplexity when routing on only k = 4/8/16/32 tokens, with and without
re-routing once the text reaches M tokens (`--reroute-at M`, default the mixture's prefix).

Teacher-forced on the validation split (--final: test, once): tokens after k are scored; without re-routing
all of them by the expert chosen on k tokens; with re-routing, tokens k..M by that expert and tokens after M
by the expert chosen on the first M tokens. Both columns score exactly the same tokens.

  python benchmarks/studies/short_prompts.py --run runs/demo [--reroute-at 64] [--max-sequences 1000]
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np

from smalltalk.data.shards import SplitData
from smalltalk.layout import RunLayout
from smalltalk.mixture.model import SmallTalkMixture
from smalltalk.routing.assignment import argmax_assignment
from smalltalk.routing.routers import score_split
from smalltalk.training.nll import batch_nll


def nll_matrix(model, data: SplitData, ids: np.ndarray, batch: int = 32) -> np.ndarray:
    """[N, S-1] per-token NLL of sequences `ids` (a research table over a sample: whole matrices are fine)."""
    out = np.empty((len(ids), data.seq_len - 1))
    for start in range(0, len(ids), batch):
        tokens = data.batch(ids[start:start + batch])
        part = np.empty((len(tokens), data.seq_len - 1))
        batch_nll(model, tokens, np.arange(len(tokens)), "cpu", part)
        out[start:start + len(tokens)] = part
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--reroute-at", type=int)
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--max-sequences", type=int, default=1000)
    ap.add_argument("--final", action="store_true", help="the test split, once (default: validation)")
    args = ap.parse_args()
    run = RunLayout(__import__("pathlib").Path(args.run))
    mixture = SmallTalkMixture.from_pretrained(run.root)
    data = SplitData(run.data, "test" if args.final else "validation")
    ids = data.sample(args.max_sequences)  # a seeded sample over all domains, not the first n
    m = args.reroute_at or mixture.prefix
    nll = [nll_matrix(mixture.expert(k), data, ids) for k in range(mixture.num_experts)]
    at_m = argmax_assignment(score_split(mixture.routers, data, ids, m))
    rows = np.arange(len(ids))
    print(f"| route on k tokens | ppl of tokens after k, no re-routing | with re-routing at {m} | "
          f"sequences whose expert changed at {m} |")
    print("|---|---|---|---|")
    for k in args.ks:
        at_k = argmax_assignment(score_split(mixture.routers, data, ids, k))
        stacked = np.stack(nll)  # [E, N, S-1]; column j predicts token j+1
        plain = stacked[at_k, rows][:, k - 1:]
        rerouted = np.concatenate([stacked[at_k, rows][:, k - 1:m - 1], stacked[at_m, rows][:, m - 1:]], axis=1)
        print(f"| {k} | {math.exp(plain.mean()):.2f} | {math.exp(rerouted.mean()):.2f} | "
              f"{(at_k != at_m).mean():.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
