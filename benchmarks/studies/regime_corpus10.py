"""Where the mixture wins (issue #41): mixture / dense against tokens per expert parameter on corpus10, validation.

Points (expert preset x steps per expert; tokens per parameter at 32 x 256 tokens a step, 41k or 132k params):
  p50   cpu-expert-0.04m,  248 steps:  ~50 tokens/param; single pass at E = 4 and 8 (0.5 / 0.9 epochs)
  p100  cpu-expert-0.04m,  500 steps: ~100, the paper's single pass at E = 4 (0.9 epochs; 1.9 at E = 8)
  p160  cpu-expert-0.04m,  800 steps: ~160 (1.5 epochs at E = 4)
  p320  cpu-expert-0.04m, 1600 steps: ~320, the configs' regime today (3 epochs at E = 4)
  p640  cpu-expert-0.04m, 3200 steps: ~640 (6 epochs at E = 4)
  p100-wide  cpu-expert-0.15m, 1600 steps: ~100 with a 3.2x larger expert, repeated (3 epochs at E = 4)
(Steps divisible by 4, so that a trunk row's trunk + experts equals its scratch twin's budget to the step.)
Rows at each point: the label oracle at E = 4 and 8 and the configs' routing of 2026-12-07 (EM from the tf-idf
split, 26k-parameter LM routers: `em-E4`) at E = 4, experts from scratch (the paper) and, at E = 4, from the
configs' trunk (a quarter of the budget); `ngram-E4`: the same EM with count-based bigram routers (issue #40),
routing that costs ~no FLOPs, the configs' routing since 2026-12-08, so also from the trunk. Every dense
baseline is matched in full, from scratch, one schedule (`matched`): trunk + experts + routing FLOPs. A trunk row
costs what its scratch twin costs (trunk + experts = the scratch experts' FLOPs, the same routers): it shares the
twin's dense model (copied, checked) and its routers and partition (hard links). Two seeds per point.

The rule printed: for each (routing, start), the regime is the cheapest point (fewest training FLOPs) whose mean
ratio is within the seed spread of the best point's. The figure: docs/regime_map.png (--plot).
Resumable: one process per core on one --root, each with OMP_NUM_THREADS=1; rows appended to --json.

  python benchmarks/studies/regime_corpus10.py [--root runs/regime] [--seeds 0 1] [--points ...] [--table-only]
      [--plot PNG]

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
    fork_stages,
    mean_sd,
    run_and_results,
    share_matched_dense,
    work_through,
)

POINTS = {"p50": ("cpu-expert-0.04m", 248), "p100": ("cpu-expert-0.04m", 500), "p160": ("cpu-expert-0.04m", 800),
          "p320": ("cpu-expert-0.04m", 1600), "p640": ("cpu-expert-0.04m", 3200),
          "p100-wide": ("cpu-expert-0.15m", 1600)}
ROWS = {  # name: (E, routing overrides, experts.init)
    "oracle-E4": (4, [*LM_EM, "routing.method=oracle"], "scratch"),
    "oracle-E4-trunk": (4, [*LM_EM, "routing.method=oracle"], "trunk"),
    "oracle-E8": (8, [*LM_EM, "routing.method=oracle"], "scratch"),
    "em-E4": (4, LM_EM, "scratch"),
    "em-E4-trunk": (4, LM_EM, "trunk"),
    # the same EM with count-based bigram routers (#40; the configs' routing since 2026-12-08)
    "ngram-E4": (4, [*LM_EM, "routing.method=ngram"], "scratch"),
    "ngram-E4-trunk": (4, [*LM_EM, "routing.method=ngram"], "trunk"),
}
TWIN = {"oracle-E4-trunk": "oracle-E4", "em-E4-trunk": "em-E4",  # same routing, same total FLOPs
        "ngram-E4-trunk": "ngram-E4"}
MAIN_PREFIX = 64
PAPER_TOKENS_PER_PARAM = {"paper 335M": 100, "paper 1.3B": 52}  # the paper's experts, one pass (issue #41)


def run_name(point: str, row: str, seed: int) -> str:
    return f"{point}-{row}-s{seed}"


def plan(points: list[str], seeds: list[int], rows: list[str]) -> list[tuple[str, str, int]]:
    """The map's backbone first (oracle E = 4, every point, seed 0), then the configs' routing, E = 8, the
    trunk rows, then the other seeds; within a tier the cheaper points first."""
    order = ["oracle-E4", "em-E4", "oracle-E8", "em-E4-trunk", "oracle-E4-trunk", "ngram-E4", "ngram-E4-trunk"]
    cost = {p: POINTS[p][1] * (3 if "wide" in p else 1) for p in points}
    jobs = [(p, r, s) for p in points for r in rows for s in seeds]
    return sorted(jobs, key=lambda j: (j[2] != seeds[0], j[2], order.index(j[1]), cost[j[0]]))


def ready(root: Path, point: str, row: str, seed: int) -> bool:
    """A trunk row waits for its scratch twin's routers and dense model (it reuses both)."""
    if row not in TWIN:
        return True
    twin = root / run_name(point, TWIN[row], seed)
    return (twin / "eval" / "results.json").is_file() or not claimed_by_other(root, twin.name)


def run_one(root: Path, point: str, row: str, seed: int, final: bool) -> dict | None:
    run = root / run_name(point, row, seed)
    experts, routing, init = ROWS[row]
    preset, steps = POINTS[point]
    if row in TWIN:
        twin = root / run_name(point, TWIN[row], seed)
        fork_stages(twin, run, ("tokenizer", "data", "routers", "partition"))
        share_matched_dense(run, twin)
    seeds = [f"{key}={seed}" for key in ("data.order_seed", "routing.seed", "routing.train.seed", "train.seed")]
    overrides = [f"data.inputs=[{CORPUS}]", f"routing.experts={experts}", f"model.preset={preset}",
                 f"train.steps={steps}", f"experts.init={init}", "dense.bigger=false", "dense.inference=false",
                 "dense.experts_only=false", *routing, *seeds]
    started = time.perf_counter()
    results = run_and_results(run, overrides, final)
    if results is None:
        return None
    if row in TWIN:
        check_copied_dense(results, run, root / run_name(point, TWIN[row], seed) / "dense" / "matched")
    main = next(r for r in results["sweep"] if r["prefix"] == MAIN_PREFIX)
    flops = results["flops"]["exact"]
    return {"point": point, "row": row, "seed": seed, "split": results["split"], "experts": experts, "init": init,
            "preset": preset, "steps": steps, "mixture_ppl": main["mixture_after"]["ppl"],
            "dense_ppl": main["dense_matched_after"]["ppl"],
            "ratio": main["mixture_after"]["ppl"] / main["dense_matched_after"]["ppl"],
            "tokens_per_param": statistics.mean(results["tokens_per_param"]["experts"]),
            "epochs": statistics.mean(results["epochs"]["experts"]), "training_flops": flops["mixture_training"],
            "minutes": round((time.perf_counter() - started) / 60, 1)}


def _groups(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["row"], r["point"]), []).append(r)
    return groups


def table(rows: list[dict]) -> str:
    groups = _groups(rows)
    split = rows[0]["split"] if rows else "validation"
    out = [f"{split} split, mixture ppl ÷ dense matched in full (from scratch, one schedule) after M̂ = "
           f"{MAIN_PREFIX}; mean ± sd over seeds", "",
           "| row | point | tokens / expert param | expert epochs | seeds | mixture ppl | ÷ dense matched in full |",
           "|---|---|---|---|---|---|---|"]
    for (row, point), g in sorted(groups.items(), key=lambda kv: (list(ROWS).index(kv[0][0]),
                                                                    g_tokens(kv[1]))):
        out.append(f"| {row} | {point} | {g_tokens(g):.0f} | {statistics.mean(r['epochs'] for r in g):.2f} | "
                   f"{len(g)} | {statistics.mean(r['mixture_ppl'] for r in g):.2f} | "
                   f"{mean_sd([r['ratio'] for r in g])} |")
    if split == "validation":
        out += ["", "the regime per row, decided on validation (the cheapest point within the seed spread of the "
                "best):", *regime(groups)]
    return "\n".join(out)


def g_tokens(group: list[dict]) -> float:
    return statistics.mean(r["tokens_per_param"] for r in group)


def regime(groups: dict[tuple[str, str], list[dict]]) -> list[str]:
    out = []
    for row in ROWS:
        stats = {point: g for (r, point), g in groups.items() if r == row}
        if not stats:
            continue
        ratio = {p: statistics.mean(r["ratio"] for r in g) for p, g in stats.items()}
        spread = {p: statistics.stdev([r["ratio"] for r in g]) if len(g) > 1 else 0.0 for p, g in stats.items()}
        best = min(ratio, key=ratio.get)
        tied = [p for p in ratio if ratio[p] - ratio[best] <= max(spread[p], spread[best])]
        cheapest = min(tied, key=lambda p: statistics.mean(r["training_flops"] for r in stats[p]))
        wins = [p for p in ratio if ratio[p] < 1]
        first_win = min(wins, key=lambda p: g_tokens(stats[p])) if wins else None
        few = any(len(stats[p]) < 2 for p in tied)
        out.append(f"- {row}: best {best} ({mean_sd([r['ratio'] for r in stats[best]])}); chosen {cheapest} "
                   f"({g_tokens(stats[cheapest]):.0f} tokens/param); the mixture wins from "
                   f"{f'{g_tokens(stats[first_win]):.0f} tokens/param ({first_win})' if first_win else 'no point'}"
                   + ("; provisional: fewer than 2 seeds" if few else ""))
    return out


def plot(rows: list[dict], png: Path) -> None:
    """Mixture / dense against tokens per expert parameter: a line per row, seed spread as error bars, the
    paper's tokens per parameter marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    groups = _groups(rows)
    for row in ROWS:
        points = sorted(((g_tokens(g), g) for (r, _), g in groups.items() if r == row), key=lambda t: t[0])
        if not points:
            continue
        xs = [x for x, _ in points]
        means = [statistics.mean(r["ratio"] for r in g) for _, g in points]
        sds = [statistics.stdev([r["ratio"] for r in g]) if len(g) > 1 else 0.0 for _, g in points]
        ax.errorbar(xs, means, yerr=sds, marker="o", capsize=3, label=row)
    for name, x in PAPER_TOKENS_PER_PARAM.items():
        ax.axvline(x, color="grey", linestyle=":", linewidth=1)
        ax.text(x, ax.get_ylim()[1], name, rotation=90, va="top", ha="right", fontsize=8, color="grey")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xticks([50, 100, 160, 320, 640], labels=["50", "100", "160", "320", "640"])
    ax.minorticks_off()
    ax.set_xlabel("training tokens per expert parameter")
    ax.set_ylabel("mixture ppl ÷ dense matched in full")
    ax.set_title("corpus10, validation, after M̂ = 64 (below 1: the mixture wins)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/regime")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--points", nargs="+", choices=list(POINTS), default=list(POINTS))
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    ap.add_argument("--json", help="default benchmarks/results/regime_corpus10.json (_final.json with --final): "
                    "committed, so the next session skips the rows it holds")
    ap.add_argument("--final", action="store_true", help="the test split of every finished run, once")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--plot", help="write the figure here (from --json) and exit")
    args = ap.parse_args()
    root = Path(args.root)
    default = RESULTS / ("regime_corpus10_final.json" if args.final else "regime_corpus10.json")
    path = Path(args.json) if args.json else default
    if args.table_only or args.plot:
        rows = json.loads(path.read_text())["rows"]
        if args.plot:
            plot(rows, Path(args.plot))
        print(table(rows))
        return 0
    if corpus_missing():
        return 0
    return work_through(plan(args.points, args.seeds, args.rows), root, path, run_name,
                        lambda root, *job: run_one(root, *job, args.final),
                        lambda r: (r["point"], r["row"], r["seed"]), table, ready)


if __name__ == "__main__":
    sys.exit(main())
