"""Router refinement from the experts (issue #27 item 5) as a lever, studied on validation on finished runs.

For each run given (e.g. runs/demo from `make demo`, and a corpus10 paper-em run of
benchmarks/studies/evidence_corpus10.py) and each setting (training sequences relabelled, fine-tuning passes), the
run is forked at its trained experts (hard links, nothing of it is changed) and `smalltalk routers refine`
runs there. Reported per setting, on the run's validation sequences (refine.heldout_sequences): agreement of
the routers' argmax with the experts' own choice (the expert of lowest loss on the whole sequence) before
and after, the mixture's perplexity over all tokens routed by each and by the experts' choice (a bound no
prefix router reaches), and the refinement's FLOPs over the experts' training FLOPs (routing cost: the
dense model matched in full gets it too). Mixture ÷ dense with the dense baseline re-matched is the
`refine` row of benchmarks/studies/evidence_corpus10.py. Finished settings are skipped; rows go to --json.

  python benchmarks/studies/refine_study.py --runs runs/demo runs/evidence/E4-paper-em-s0 \
      [--root runs/refine-study] [--json benchmarks/results/refine_study.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from corpus10_runs import fork_until_experts

from smalltalk.cli import main as smalltalk

SETTINGS = [(2048, 1.0), (8192, 1.0), (32768, 1.0), (8192, 3.0)]  # (sequences, passes)


def study_one(run: Path, root: Path, sequences: int, passes: float) -> dict | None:
    fork = root / f"{run.parent.name}-{run.name}-n{sequences}-p{passes:g}"
    fork_until_experts(run, fork)
    if not fork.is_dir():
        print(f"{run}: its experts are not trained yet (skipped)", flush=True)
        return None
    manifest = fork / "routers-refined" / "manifest.json"
    if not manifest.is_file() and smalltalk(["routers", "refine", "--run", str(fork), "--sequences", str(sequences),
                                             "--set", f"refine.passes={passes}"]) != 0:
        return None
    refined = json.loads(manifest.read_text())
    experts = sum(json.loads((fork / rel).parent.joinpath("train_manifest.json").read_text())["training_flops"]
                  ["exact"] for rel in json.loads((fork / "mixture.json").read_text())["expert_dirs"])
    return {**refined["heldout"], "heldout_sequences": refined["heldout"]["sequences"], "run": str(run),
            "sequences": sequences, "passes": passes,
            "refine_flops_share": refined["flops"]["exact"]["total"] / experts,
            "labelled": refined["refine"]["labelled"]}


def table(rows: list[dict]) -> str:
    out = ["validation split: agreement with the experts' own choice and mixture ppl (all tokens), before -> after",
           "", "| run | sequences | passes | agreement | ppl | experts' choice ppl | refinement FLOPs / experts' |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['run']} | {r['sequences']} | {r['passes']:g} | {r['agreement_before']:.1%} -> "
                   f"{r['agreement_after']:.1%} | {r['ppl_before']:.3f} -> {r['ppl_after']:.3f} | "
                   f"{r['ppl_experts_choice']:.3f} | {r['refine_flops_share']:.1%} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True, help="finished runs (experts trained)")
    ap.add_argument("--root", default="runs/refine-study")
    ap.add_argument("--json", default="benchmarks/results/refine_study.json")
    args = ap.parse_args()
    path, root = Path(args.json), Path(args.root)
    done = json.loads(path.read_text())["rows"] if path.is_file() else []
    seen = {(r["run"], r["sequences"], r["passes"]) for r in done}
    for run in map(Path, args.runs):
        for sequences, passes in SETTINGS:
            if (str(run), sequences, passes) in seen:
                continue
            row = study_one(run, root, sequences, passes)
            if row is not None:
                done.append(row)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"rows": done}, indent=1) + "\n")
    print(table(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
