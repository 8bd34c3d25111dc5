"""The routing study: which EM lever brings the mixture to the oracle? (docs/routing.md)

Every figure is from the validation split (`--final`: the test split, once, for the final table; results
from the test split are refused otherwise). Each lever is one `smalltalk run` of configs/corpus10.yaml at
E = 4 (the grid's full budget: experts of 1,600 steps, where the mixture wins), changed only in that
lever, for each seed (routing.seed and routing.train.seed: the random split and the routers'
initialisation). Each run's dense model is matched to its own budget, routing included; the experts-only
match is trained once and copied to every run; with --reuse-grid, seed 0 of the baseline and the oracle are the
grid's em-4 and oracle-4 runs (the same configs), hard-linked. Seed 0 of every lever runs first, so a
partial study still covers every lever. Prints, per lever: the routers' training budget (prefixes each
router trained on), router training FLOPs / experts', held-out NMI of the last EM round, partition NMI,
and mixture ÷ dense after M̂ = 64 (mean and spread over seeds); writes --json and a plot.

A first version cut the experts to 400 steps to fit in an hour: there every mixture, the oracle's too,
was worse than dense (1.07 and 1.10): too few tokens per parameter for specialisation to pay
(docs/studies/regime.md), so the levers must be compared at the full budget.

  python benchmarks/studies/routing_study.py [--root runs/routing-study] [--seeds 0 1] [--only distinct-init]
      [--reuse-grid runs/corpus10] [--table-only]

Data: `smalltalk corpus corpus10 runs/corpus10-data --install` builds corpus10 (docs/corpus10.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from corpus10_runs import CORPUS, LM_EM, run_and_results, share_experts_only_dense

from smalltalk.config import load_config

LEVERS = {
    # the paper's EM: 12 rounds, each router one pass over its share of a fresh chunk, shared init, random
    # round 0 (pinned below, whatever configs/corpus10.yaml's departures are)
    "baseline": [],
    "distinct-init": ["routing.router_init=distinct"],
    "tfidf-warm-start": ["routing.init_split=tfidf"],
    "rounds-6": ["routing.rounds=6"],
    "rounds-24": ["routing.rounds=24"],
    "passes-3": ["routing.share_passes=3"],
    "fixed-100-steps": ["routing.share_passes=null"],  # the M-step before issue #27: ~3.1 passes at E = 4
    "lr-1e-2": ["routing.train.lr=1e-2"],
    "train-prefix-32": ["routing.prefix=32"],
}
ORACLE = ["routing.method=oracle"]
MAIN_PREFIX = 64


def run_one(root: Path, name: str, overrides: list[str], donor: Path | None, final: bool = False) -> dict | None:
    run = root / name
    share_experts_only_dense(run, donor)
    results = run_and_results(run, overrides, final)
    if results is None:
        return None
    main = next(r for r in results["sweep"] if r["prefix"] == MAIN_PREFIX)
    rc = load_config(run / "config.json").routing
    quality = json.loads((run / "partition" / "manifest.json").read_text()).get("quality", {})
    row = {"run": name, "ratio": main["mixture_after"]["ppl"] / main["dense_matched_after"]["ppl"],
           "training_overhead": results["flops"]["exact"]["training_overhead"], "partition_nmi": quality.get("nmi")}
    history = run / "routers" / "em_history.json"
    if history.exists():  # EM: prefixes each router trained on, and the last round's held-out NMI
        row["prefixes_seen"] = rc.rounds * rc.steps_per_round() * rc.train.micro_batch_size * rc.train.grad_accum
        row["heldout_nmi"] = json.loads(history.read_text())["rounds"][-1].get("heldout_nmi")
    return row


def summarise(rows: list[dict]) -> list[dict]:
    by_lever: dict[str, list[dict]] = {}
    for row in rows:
        by_lever.setdefault(row["lever"], []).append(row)
    table = []
    for lever, group in by_lever.items():
        ratios = [r["ratio"] for r in group]
        table.append({"lever": lever, "seeds": len(group), "ratio_mean": statistics.mean(ratios),
                      "ratio_spread": max(ratios) - min(ratios), "ratios": ratios,
                      "prefixes_seen": group[0].get("prefixes_seen"),
                      "training_overhead": statistics.mean(r["training_overhead"] for r in group),
                      "heldout_nmi": _mean([r.get("heldout_nmi") for r in group]),
                      "partition_nmi": _mean([r.get("partition_nmi") for r in group])})
    return table


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def print_table(table: list[dict]) -> None:
    print("| lever | seeds | prefixes seen | router FLOPs / experts' | held-out NMI | partition NMI | "
          "mixture ÷ dense (M̂ 64) | spread |\n|---|---|---|---|---|---|---|---|")
    for t in table:
        nmi = "-" if t["heldout_nmi"] is None else f"{t['heldout_nmi']:.3f}"
        seen = "-" if t["prefixes_seen"] is None else f"{t['prefixes_seen']:,}"
        print(f"| {t['lever']} | {t['seeds']} | {seen} | {t['training_overhead']:.1%} | {nmi} | "
              f"{t['partition_nmi'] or 0:.3f} | {t['ratio_mean']:.3f} | {t['ratio_spread']:.3f} |")


def plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    names = [t["lever"] for t in table]
    means = [t["ratio_mean"] for t in table]
    ax.barh(names, means, xerr=[t["ratio_spread"] / 2 for t in table], color="tab:blue")
    oracle = next((t["ratio_mean"] for t in table if t["lever"] == "oracle"), None)
    if oracle is not None:
        ax.axvline(oracle, color="tab:red", ls="--", label="oracle")
        ax.legend()
    ax.set_xlim(min(means) - 0.02, max(means) + 0.02)
    ax.set_xlabel("mixture ppl ÷ compute-matched dense ppl (after M̂ = 64; lower is better)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/routing-study")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--only", nargs="+", choices=[*LEVERS, "oracle"])
    ap.add_argument("--reuse-grid", help="the experiment_corpus10 root whose em-4 / oracle-4 are seed 0")
    ap.add_argument("--json", default="runs/routing-study/study.json")
    ap.add_argument("--plot", default="docs/routing_study.png")
    ap.add_argument("--table-only", action="store_true", help="print the table and plot of --json, run nothing")
    ap.add_argument("--final", action="store_true", help="the test split, once, for the final table (every "
                    "choice is made on the validation table this prints without it)")
    args = ap.parse_args()
    if args.table_only:  # e.g. after a study stopped part-way
        table = summarise(json.loads(Path(args.json).read_text())["rows"])
        print_table(table)
        plot(table, Path(args.plot))
        return 0
    if not CORPUS.is_dir():
        print(f"corpus10 not found at {CORPUS} (skipping)")
        return 0
    root = Path(args.root)
    # every lever alone against the paper's EM, whatever configs/corpus10.yaml's defaults are
    common = [*LM_EM, f"data.inputs=[{CORPUS}]", "routing.experts=4", "routing.init_split=random",
              "routing.router_init=shared", "routing.share_passes=1"]
    if args.reuse_grid:  # seed 0 of baseline and oracle = the grid's em-4 and oracle-4 (same configs)
        for lever, grid_run in (("baseline", "em-4"), ("oracle", "oracle-4")):
            source, target = Path(args.reuse_grid) / grid_run, root / f"{lever}-s{args.seeds[0]}"
            if (source / "eval").exists() and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                subprocess.run(["cp", "-al", str(source), str(target)], check=True)
    names = args.only or [*LEVERS, "oracle"]
    plan = [(lever, seed) for seed in args.seeds for lever in names if lever != "oracle" or seed == args.seeds[0]]
    rows, dense = [], None
    for lever, seed in plan:
        overrides = [*common, *(ORACLE if lever == "oracle" else LEVERS[lever]),
                     f"routing.seed={seed}", f"routing.train.seed={seed}"]
        row = run_one(root, f"{lever}-s{seed}", overrides, dense, args.final)
        if row is None:
            continue
        dense = dense or root / row["run"]
        rows.append({"lever": lever, "seed": seed, **row})
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows, "table": summarise(rows)}, indent=1))
    table = summarise(rows)
    print_table(table)
    plot(table, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
