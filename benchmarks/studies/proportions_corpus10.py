"""SmallTalk at its own proportions (issue #40): routing a few percent of inference, on corpus10, validation.

Rows, each a named configuration of configs/corpus10.yaml (experts from its trunk, EM from the tf-idf split):
  paper       the paper throughout: experts from scratch, EM from a random split, the 26k-parameter LM routers;
              its dense models: matched in full and matched to the experts only (the paper's match)
  default     the configs' routing: EM from the tf-idf split, LM routers of 26k parameters (65% of an expert's
              FLOPs per token)
  router-0.01m  the same EM with 10k-parameter LM routers (cpu-router-0.01m)
  ngram-2     the same EM with count-based bigram routers (routing/ngram.py): table look-ups, no matmul
  ngram-1     the same with unigram routers (a bag of tokens per expert)
Every row trains two dense baselines from scratch with one schedule on the whole budget (trunk + experts +
every routing FLOP): `matched` (one expert's architecture) and `inference` (per sequence the mixture's
inference FLOPs: routers on M̂ + one expert). ngram-1 and ngram-2 cost the same FLOPs by construction and share
their dense models (copied, checked). Seeds move the data order and every initialisation.

The rule printed: among the rows with the configs' expert start, those within the seed spread of the best mean
÷ dense matched in full at every E tie; the default is the one of them with the least routing share of
inference FLOPs. Targets (issue #40, 3 seeds): at E = 4 routing <= 10% of the mixture's inference FLOPs and
<= 3% of its training FLOPs; mixture / dense <= 0.85 at E = 4 and <= 0.76 at E = 8; the inference-matched
dense model beaten at E = 4 and 8.

Resumable and shareable like the evidence grid (one process per core on one --root, each with OMP_NUM_THREADS=1;
rows appended to --json).

  python benchmarks/studies/proportions_corpus10.py [--root runs/proportions] [--seeds 0 1 2] [--experts 4 8]
      [--rows ...] [--steps N] [--final] [--table-only]

--steps N: a named cheaper variant, each expert trained N steps instead of the config's 1600 (its runs in
ROOT/stepsN, its rows in proportions_corpus10_stepsN.json, never mixed with the grid's): a row of the grid costs
~4 h of one core (three dense models of the whole budget each), more than a working session's machine lives.
With fewer expert steps the routing's fixed cost is a larger share of the budget: judge routing quality there,
the share targets at the config's steps.

Data: `smalltalk corpus corpus10 runs/corpus10-data --install` builds corpus10 (docs/corpus10.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from corpus10_runs import (
    CORPUS,
    LM_EM,
    RESULTS,
    check_copied_dense,
    claimed_by_other,
    corpus_missing,
    mean_sd,
    run_and_results,
    share_matched_dense,
    work_through,
)

PAPER = [*LM_EM, "experts.init=scratch", "routing.init_split=random", "dense.experts_only=true"]
ROWS = {
    "paper": PAPER,
    "default": LM_EM,
    "router-0.01m": [*LM_EM, "routing.router.preset=cpu-router-0.01m"],
    "ngram-2": [*LM_EM, "routing.method=ngram"],
    "ngram-1": [*LM_EM, "routing.method=ngram", "routing.ngram_order=1"],
}
CANDIDATES = ("default", "router-0.01m", "ngram-2", "ngram-1")  # the routing choices, same expert start
TWIN = {"ngram-1": "ngram-2"}  # the same routing FLOPs: the same dense models
MAIN_PREFIX = 64
TARGETS = {4: 0.85, 8: 0.76}
SHARE_TARGETS = {"inference": 0.10, "training": 0.03}  # routing's share of the mixture's FLOPs at E = 4


def run_name(experts: int, row: str, seed: int) -> str:
    return f"E{experts}-{row}-s{seed}"


def plan(experts: list[int], seeds: list[int], rows: list[str]) -> list[tuple[int, str, int]]:
    """Seed 0 of every row at each E first (smallest E first), then the other seeds in the same order."""
    jobs = [(e, row, s) for s in seeds for e in sorted(experts) for row in rows]
    return sorted(jobs, key=lambda j: (j[2] != seeds[0], j[2], j[0], list(ROWS).index(j[1])))


def ready(root: Path, experts: int, row: str, seed: int) -> bool:
    """A twin waits while its twin trains the dense models they share."""
    twin = root / run_name(experts, TWIN.get(row, row), seed)
    return not (row in TWIN and claimed_by_other(root, twin.name) and not (twin / "eval" / "results.json").is_file())


def run_one(root: Path, experts: int, row: str, seed: int, final: bool, steps: int | None = None) -> dict | None:
    run = root / run_name(experts, row, seed)
    if row in TWIN:
        for kind in ("matched", "inference"):
            share_matched_dense(run, root / run_name(experts, TWIN[row], seed), kind)
    seeds = [f"{key}={seed}" for key in ("data.order_seed", "routing.seed", "routing.train.seed", "train.seed")]
    overrides = [f"data.inputs=[{CORPUS}]", f"routing.experts={experts}", "dense.bigger=false",
                 "dense.inference=true", "dense.experts_only=false", *ROWS[row], *seeds,
                 *([f"train.steps={steps}"] if steps else [])]
    started = time.perf_counter()
    results = run_and_results(run, overrides, final)
    if results is None:
        return None
    if row in TWIN and (twin := root / run_name(experts, TWIN[row], seed) / "dense" / "matched").is_dir():
        check_copied_dense(results, run, twin)
    main = next(r for r in results["sweep"] if r["prefix"] == MAIN_PREFIX)
    flops = results["flops"]["exact"]
    inference = flops["inference"]
    mixture = main["mixture_after"]["ppl"]
    return {"experts": experts, "row": row, "seed": seed, "steps": steps, "split": results["split"],
            "mixture_ppl": mixture,
            "dense_ppl": main["dense_matched_after"]["ppl"], "ratio_full": mixture / main["dense_matched_after"]["ppl"],
            "ratio_inference": mixture / main["dense_inference_after"]["ppl"],
            "ratio_experts_only": (mixture / main["dense_matched-experts_after"]["ppl"]
                                   if "dense_matched-experts_after" in main else None),
            "routing_training_share": flops["routing_overhead"]["total"] / flops["mixture_training"],
            "routing_inference_share": inference["routing"] / inference["total"],
            "dense_inference_over_mixture": inference["dense_inference"] / inference["total"],
            "epochs": results["epochs"], "tokens_per_param": results["tokens_per_param"],
            "minutes": round((time.perf_counter() - started) / 60, 1)}


def table(rows: list[dict]) -> str:
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["experts"], r["row"]), []).append(r)
    split = rows[0]["split"] if rows else "validation"
    steps = {r.get("steps") for r in rows} - {None}
    variant = f"the variant of {', '.join(map(str, sorted(steps)))} steps per expert; " if steps else ""
    out = [f"{variant}{split} split, mixture ppl ÷ dense ppl after M̂ = {MAIN_PREFIX}; mean ± sd over seeds; dense from "
           "scratch, one schedule, the whole budget", "",
           "| E | row | seeds | ÷ dense matched in full | ÷ dense matched at inference | ÷ dense experts only | "
           "routing / training FLOPs | routing / inference FLOPs |", "|---|---|---|---|---|---|---|---|"]
    for (experts, row), group in sorted(groups.items(), key=lambda kv: (kv[0][0], list(ROWS).index(kv[0][1]))):
        only = [r["ratio_experts_only"] for r in group if r["ratio_experts_only"] is not None]
        out.append(f"| {experts} | {row} | {len(group)} | {mean_sd([r['ratio_full'] for r in group])} | "
                   f"{mean_sd([r['ratio_inference'] for r in group])} | {mean_sd(only) if only else '–'} | "
                   f"{statistics.mean(r['routing_training_share'] for r in group):.2%} | "
                   f"{statistics.mean(r['routing_inference_share'] for r in group):.2%} |")
    if split != "validation":
        return "\n".join([*out, "", f"the {split} split, evaluated once: no choice is made from it"])
    return "\n".join([*out, "", *decision(groups)])


def decision(groups: dict[tuple[int, str], list[dict]]) -> list[str]:
    """The rule: rows tied with the best within the seed spread at every E; the cheapest at inference wins."""
    out, tied, cost = ["the routing default, decided on validation:"], set(CANDIDATES), {}
    for experts in sorted({e for e, _ in groups}):
        stats = {row: [r["ratio_full"] for r in g] for (e, row), g in groups.items() if e == experts and
                 row in CANDIDATES}
        if not stats:
            continue
        best = min(stats, key=lambda row: statistics.mean(stats[row]))
        spread = {row: statistics.stdev(v) if len(v) > 1 else 0.0 for row, v in stats.items()}
        ties = [row for row, v in stats.items()
                if statistics.mean(v) - statistics.mean(stats[best]) <= max(spread[row], spread[best])]
        tied &= set(ties) | (set(CANDIDATES) - set(stats))
        for row in stats:
            cost.setdefault(row, []).extend(r["routing_inference_share"] for r in groups[(experts, row)])
        few = [row for row in ties if len(stats[row]) < 3]
        out.append(f"- E = {experts}: best {best} {mean_sd(stats[best])}; tied within the seed spread: "
                   f"{', '.join(ties)}" + (f" ({', '.join(few)}: fewer than 3 seeds, provisional)" if few else ""))
    if not cost:
        return [*out, f"- no row of the routing candidates ({', '.join(CANDIDATES)}) yet"]
    tied &= set(cost)
    if not tied:
        return [*out, "- no row ties with the best at every E: the choice depends on E"]
    chosen = min(tied, key=lambda row: (statistics.mean(cost[row]), CANDIDATES.index(row)))
    out.append(f"- chosen: {chosen} ({statistics.mean(cost[chosen]):.2%} of the mixture's inference FLOPs)")
    return [*out, "", "targets (3 seeds):", *targets(groups, chosen)]


def targets(groups: dict[tuple[int, str], list[dict]], row: str) -> list[str]:
    out = []
    for experts, target in TARGETS.items():
        group = groups.get((experts, row))
        if not group:
            continue
        full, inference = (statistics.mean(r[k] for r in group) for k in ("ratio_full", "ratio_inference"))
        out.append(f"- E = {experts}: ÷ dense matched in full {full:.3f} (≤ {target}: "
                   f"{'met' if full <= target else 'MISSED'}); ÷ dense matched at inference {inference:.3f} "
                   f"({'beaten' if inference < 1 else 'NOT beaten'}); {len(group)} seed(s)")
        if experts == 4:
            for kind, limit in SHARE_TARGETS.items():
                share = statistics.mean(r[f"routing_{kind}_share"] for r in group)
                out.append(f"  routing / {kind} FLOPs {share:.2%} (≤ {limit:.0%}: "
                           f"{'met' if share <= limit else 'MISSED'})")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/proportions")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--experts", nargs="+", type=int, default=[4, 8])
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    ap.add_argument("--json", help="default benchmarks/results/proportions_corpus10.json (_final.json with --final): "
                    "committed, so the next session skips the rows it holds")
    ap.add_argument("--steps", type=int, help="the cheaper variant: N steps per expert (see above)")
    ap.add_argument("--final", action="store_true", help="the test split of every finished run, once")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    variant = f"_steps{args.steps}" if args.steps else ""
    root = Path(args.root) / variant.lstrip("_")
    default = RESULTS / f"proportions_corpus10{variant}{'_final' if args.final else ''}.json"
    path = Path(args.json) if args.json else default
    if args.table_only:
        print(table(json.loads(path.read_text())["rows"]))
        return 0
    if corpus_missing():
        return 0
    return work_through(plan(args.experts, args.seeds, args.rows), root, path, run_name,
                        lambda root, *job: run_one(root, *job, args.final, args.steps),
                        lambda r: (r["experts"], r["row"], r["seed"]), table, ready)


if __name__ == "__main__":
    sys.exit(main())
