"""Elastic experts on corpus10: hold out one domain, train E = 4 on the other nine, add the held-out domain
as expert 5 (`smalltalk experts add`), and report
  (a) perplexity on the new domain before / after,
  (b) the share of old-domain sequences whose expert changed,
  (c) old-domain perplexity before / after,
all on the validation splits (--final: test, once), routed on the first M̂ = routing.prefix tokens, perplexity
after the prefix.
Runtime on 2 cores: ~20 min (the E = 4 run without dense baselines, then ~4 min for the new pair).

  python benchmarks/studies/elastic_corpus10.py [--root runs/elastic] [--holdout german_de]

Data: `smalltalk corpus corpus10 runs/corpus10-data --install` builds corpus10 (docs/corpus10.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from corpus10_runs import CORPUS, LM_EM, set_flags

from smalltalk.cli import main as smalltalk
from smalltalk.data.shards import SplitData
from smalltalk.experts.elastic import compare_mixtures, read_mixture
from smalltalk.fsutil import read_json, write_json
from smalltalk.layout import RunLayout

ROOT = Path(__file__).resolve().parents[2]


def run_stage(args: list, done: Path) -> None:
    if done.exists():
        return
    if smalltalk([str(a) for a in args]) != 0:
        sys.exit(f"stage {args[:2]} failed")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/elastic")
    ap.add_argument("--holdout", default="german_de", help="corpus10 file stem of the domain to add later")
    ap.add_argument("--max-sequences", type=int, default=2000, help="sequences per side")
    ap.add_argument("--final", action="store_true", help="the test splits, once (default: validation)")
    args = ap.parse_args()
    corpus = CORPUS
    if not corpus.is_dir():
        print(f"corpus10 not found at {corpus} (skipping)")
        return 0
    held = corpus / f"{args.holdout}.jsonl.gz"
    rest = sorted(p for p in corpus.glob("*.jsonl.gz") if p != held)
    run = RunLayout(Path(args.root) / f"without-{args.holdout}")
    common = ["--config", ROOT / "configs" / "corpus10.yaml", "--run", run.root,
              "--set", f"data.inputs=[{','.join(map(str, rest))}]", "--set", "routing.experts=4",
              *set_flags(LM_EM)]  # the LM routers it was measured with
    run_stage(["tokenizer", "train", *common], run.tokenizer / "manifest.json")
    run_stage(["data", "prepare", *common], run.data / "manifest.json")
    run_stage(["routers", "train", *common], run.routers / "manifest.json")
    run_stage(["partition", *common], run.partition / "manifest.json")
    run_stage(["experts", "train", "--all", *common], run.root / "mixture.json")

    before_path = run.root / "eval" / "elastic_before.json"
    if not before_path.exists():
        write_json(before_path, read_mixture(run))
    before = read_json(before_path)
    if len(read_mixture(run)["expert_dirs"]) == len(before["expert_dirs"]):
        if smalltalk([str(a) for a in ["experts", "add", *common, "--data", held]]) != 0:
            sys.exit("experts add failed")
    after = read_mixture(run)
    prefix = before["prefix"]
    new_dir = after["expert_dirs"][-1]
    rows = {}
    for name, data_dir in (("new domain", Path(after["elastic"][-1]["data"])), ("old domains", run.data)):
        data = SplitData(data_dir if data_dir.is_absolute() else run.root / data_dir,
                         "test" if args.final else "validation")
        ids = data.sample(args.max_sequences)  # a seeded sample over all domains, not the first n
        rows[name] = compare_mixtures(run.root, before, after, data, ids, prefix)
        rows[name]["to_new_expert"] = rows[name]["after"]["loads"].get(new_dir, 0) / len(ids)
    write_json(run.root / "eval" / "elastic.json", rows)
    new, old = rows["new domain"], rows["old domains"]
    print(json.dumps(rows, indent=1))
    print(f"\nheld-out domain: {args.holdout}; routed on the first {prefix} tokens; ppl after the prefix; "
          f"{'test' if args.final else 'validation'} sequences: new {new['sequences']}, old {old['sequences']}")
    print("| | before (E = 4) | after (E = 5) |\n|---|---|---|")
    print(f"| (a) new-domain ppl | {new['before']['ppl_after']:.2f} | {new['after']['ppl_after']:.2f} |")
    print(f"| new-domain sequences routed to the new expert | – | {new['to_new_expert']:.1%} |")
    print(f"| (b) old-domain sequences whose expert changed | – | {old['changed']:.1%} "
          f"({old['to_new_expert']:.1%} to the new expert) |")
    print(f"| (c) old-domain ppl | {old['before']['ppl_after']:.2f} | {old['after']['ppl_after']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
