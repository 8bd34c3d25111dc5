"""Does a seeded sampled request give the same text alone and inside a batch? (docs/serving.md)

The batching engine is driven in-process: each round sends 24 seeded, sampled requests (mixed prompts,
so mixed experts; temperatures 0.7-1.3, top_p 0.9 or 1.0, 8-32 new tokens) one at a time, then all at
once with staggered arrivals, and counts the texts that came out identical.

  python benchmarks/checks/batch_equality.py --run runs/demo [--rounds 10]
  python benchmarks/checks/batch_equality.py --run RUN --synthetic   # a run of the tests' synthetic documents
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "speed"))  # bench_serve
from bench_serve import PROMPTS  # noqa: E402

from smalltalk.mixture.model import SmallTalkMixture  # noqa: E402
from smalltalk.serving.batching import BatchedEngine  # noqa: E402


def _prompts(synthetic: bool) -> list[str]:
    if not synthetic:
        return PROMPTS
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.conftest import make_documents

    return [" ".join(d["text"].split()[:4]) for d in make_documents(40, seed=3)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--synthetic", action="store_true", help="prompts of the tests' synthetic documents")
    args = ap.parse_args()
    engine = BatchedEngine(SmallTalkMixture.from_pretrained(args.run), "smalltalk", 64)
    prompts = _prompts(args.synthetic)

    def complete(job: dict) -> str:
        req = engine.validate(dict(job), chat=False)
        return engine.generate(req, engine.route(req))[0]

    same = total = 0
    for r in range(args.rounds):
        rng = random.Random(r)
        jobs = [{"prompt": rng.choice(prompts) * (1 if args.synthetic else rng.randint(1, 3)),
                 "max_tokens": rng.choice([8, 16, 24 if args.synthetic else 32]),
                 "temperature": rng.choice([0.7, 1.0, 1.3]), "top_p": rng.choice([0.9, 1.0]), "seed": 100 * r + i}
                for i in range(24)]
        alone = [complete(job) for job in jobs]
        together: list[str | None] = [None] * len(jobs)

        def send(i: int, job: dict, out: list) -> None:
            time.sleep((i % 7) * 0.01)  # staggered: rows join batches already running
            out[i] = complete(job)

        threads = [threading.Thread(target=send, args=(i, job, together)) for i, job in enumerate(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        same += sum(a == b for a, b in zip(alone, together, strict=True))
        total += len(jobs)
    print(f"{same}/{total} sampled texts identical alone and in a batch; most rows in one step: {engine.peak_rows}")
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
