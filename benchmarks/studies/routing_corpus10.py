"""Routing quality on corpus10 (runs/corpus10-data) with E = 10: EM routers vs tf-idf vs random.

Prepares corpus10 (vocab 1024, seq 256), trains EM routers with prefix 32 and with prefix 256, the
tf-idf and random baselines, and prints NMI / purity against the 10 domain labels on the validation split
(--final: test, once)
at inference prefixes 32 and 256, plus the EM curve (NMI per round); then the router-size comparison (EM
at prefix 256 with each of --sizes). Held-out sets and chunks follow the data's seeded order (never the
first sequences of a file-ordered split). About 30-40 minutes on 2 cores.

  python benchmarks/studies/routing_corpus10.py [--run runs/routing10] [--rounds 6] [--chunk 8192]

Data: `smalltalk corpus corpus10 runs/corpus10-data --install` builds corpus10 (docs/corpus10.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from smalltalk.cli import main as smalltalk
from smalltalk.fsutil import read_json
from smalltalk.routing.compare import compare_routers, format_table

CORPUS = Path(__file__).resolve().parents[2] / "runs" / "corpus10-data"  # smalltalk corpus corpus10


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/routing10")
    ap.add_argument("--corpus", default=str(CORPUS))
    ap.add_argument("--experts", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=60, help="router steps per round")
    ap.add_argument("--router", default="cpu-router-0.1m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--final", action="store_true", help="the test split, once (default: validation)")
    ap.add_argument("--sizes", nargs="*", default=["cpu-router-0.03m"],
                    help="other router presets to train at prefix 256 (router-size comparison)")
    args = ap.parse_args()
    split = "test" if args.final else "validation"
    if not Path(args.corpus).is_dir():
        print(f"corpus not found: {args.corpus} (skipping)")
        return 0
    run = Path(args.run)
    base = ["--run", str(run), "--set", f"data.inputs=[{args.corpus}]", "--set", "data.seq_len=256",
            "--set", "tokenizer.vocab_size=1024"]
    routing = [*base, "--experts", str(args.experts), "--rounds", str(args.rounds), "--chunk", str(args.chunk),
               "--router", args.router, "--set", f"routing.train.steps={args.steps}",
               "--set", "routing.train.lr=3e-3", "--set", "routing.train.warmup_steps=20",
               "--set", f"routing.train.num_threads={args.threads}", "--set", "routing.train.tensorboard=false",
               "--set", "routing.heldout_sequences=1024"]
    if not (run / "data" / "manifest.json").exists():
        assert smalltalk(["tokenizer", "train", *base]) == 0
        assert smalltalk(["data", "prepare", *base]) == 0
    dirs = []
    for prefix in (32, 256):
        out = run / f"routers-em-{prefix}"
        if not (out / "manifest.json").exists():
            assert smalltalk(["routers", "train", *routing, "--prefix", str(prefix), "--out", str(out)]) == 0
        dirs.append(out)
    sized = {args.router: run / "routers-em-256"}
    for preset in args.sizes:
        out = sized[preset] = run / f"routers-em-256-{preset}"
        if not (out / "manifest.json").exists():
            assert smalltalk(["routers", "train", *routing, "--prefix", "256", "--router", preset,
                              "--out", str(out)]) == 0
    for method in ("tfidf", "random"):
        out = run / f"routers-{method}"
        if not (out / "manifest.json").exists():
            assert smalltalk(["routers", "train", *routing, "--method", method, "--prefix", "256",
                              "--out", str(out)]) == 0
        dirs.append(out)
    rows = compare_routers(dirs, run / "data", split, [32, 256])
    print(format_table(rows))
    (run / "routing_compare.json").write_text(json.dumps(rows, indent=2) + "\n")
    for prefix in (32, 256):
        history = read_json(run / f"routers-em-{prefix}" / "em_history.json")["rounds"]
        curve = [f"{r['heldout_nmi']:.3f}" for r in history]
        print(f"EM curve, prefix {prefix}: held-out NMI per round {curve}; "
              f"best-router changes {[r['best_changed_fraction'] for r in history]}")
    print(f"\nrouter size (EM, prefix 256): | router | non-embedding params | held-out NMI per round | {split} NMI "
          "(argmax, M̂ 256) |")
    for preset, out in sized.items():
        history = read_json(out / "em_history.json")["rounds"]
        spec = read_json(out / "manifest.json")["router_spec"]
        nmi = compare_routers([out], run / "data", split, [256])[0]["argmax"]["nmi"]
        curve = " ".join(f"{r['heldout_nmi']:.2f}" for r in history)
        print(f"| {preset} | d={spec['hidden_size']} L={spec['num_layers']} | {curve} | {nmi:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
