"""Re-decide on validation the two choices made on test figures before issue #27, on `make demo`'s run.

- The top-k ensemble's posterior temperature (`eval.top_k_temperatures`; c-BTM's rule, docs/evaluation.md):
  `smalltalk eval` of the finished run into its own directory, k in {1, 2, 4}, T in TEMPERATURES.
- SFT routing (`sft.route_on`: the first user message or the whole chat-formatted prompt) with and without
  replay of pre-training text: `smalltalk sft` of the run into its own directory per setting
  (docs/post-training.md), the demo instruction set's validation instructions.

Choices are made on the validation figures this prints. `--final --temperatures T...` then evaluates the
ensembles at the chosen temperatures on the test split, once; the chosen SFT setting's test figure is the
`sft` stage's own (`smalltalk sft --final`, which `make demo` runs). Finished steps are skipped; results go
to --json.

  python benchmarks/studies/demo_choices.py [--run runs/demo] [--sft-data runs/demo-sft] [--root runs/demo-choices]
      [--json benchmarks/results/demo_choices.json] [--final] [--table-only]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from smalltalk.cli import main as smalltalk

TEMPERATURES = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]
TOP_K = [1, 2, 4]
SFT_SETTINGS = [("user_text", 0.0), ("prompt", 0.0), ("user_text", 0.5), ("prompt", 0.5)]


def top_k_rows(run: Path, root: Path, final: bool, temperatures: list[float]) -> list[dict] | None:
    """The top-k rows of one evaluation of `run` (validation, or test once with `final`)."""
    out = root / ("topk-final" if final else "topk")
    results = out / "results.json"
    if not results.is_file():
        args = ["eval", "--run", str(run), "--out", str(out), "--set", f"eval.top_k={TOP_K}",
                "--set", f"eval.top_k_temperatures={temperatures}", *(["--final"] if final else [])]
        if smalltalk(args) != 0:
            return None
    data = json.loads(results.read_text())
    return [{"k": r["k"], "temperature": r["temperature"], "ppl_after": r["after"]["ppl"],
             "ppl_all": r["all"]["ppl"], "split": data["split"], "main_prefix": data["main_prefix"]}
            for r in data["top_k"]]


def sft_row(run: Path, data: Path, root: Path, route_on: str, replay: float) -> dict | None:
    """One SFT setting of `run`, measured on the validation instructions."""
    out = root / f"sft-{route_on}-replay{replay:g}"
    results = out / "results.json"
    if not results.is_file():
        args = ["sft", "--run", str(run), "--data", str(data), "--out", str(out), "--set", f"sft.route_on={route_on}",
                "--set", f"sft.replay={replay}"]
        if smalltalk(args) != 0:
            return None
    r = json.loads(results.read_text())
    return {"route_on": route_on, "replay": replay, "split": r["split"], **r["perplexity"]["all"],
            "pretraining": r["pretraining_perplexity"], "routing_stability": r.get("routing_stability")}


def table(result: dict) -> str:
    out = []
    rows = result.get("top_k", [])
    if rows:
        out += [f"top-k ensembles, {rows[0]['split']} split, perplexity after M̂ = {rows[0]['main_prefix']}:", "",
                "| T | " + " | ".join(f"k = {k}" for k in TOP_K) + " |", "|---|" + "---|" * len(TOP_K)]
        for t in sorted({r["temperature"] for r in rows}):
            cells = {r["k"]: r["ppl_after"] for r in rows if r["temperature"] == t}
            out.append(f"| {t:g} | " + " | ".join(f"{cells[k]:.2f}" if k in cells else "-" for k in TOP_K) + " |")
        for k in TOP_K[1:]:
            best = min((r for r in rows if r["k"] == k), key=lambda r: r["ppl_after"])
            out.append(f"- k = {k}: lowest at T = {best['temperature']:g} ({best['ppl_after']:.2f})")
    sft = result.get("sft", [])
    if sft:
        out += ["", f"SFT, {sft[0]['split']} instructions: assistant-token perplexity; pre-training text before -> "
                "after", "", "| route_on | replay | mixture SFT | dense SFT | pre-training: mixture | dense | "
                "routing stability |", "|---|---|---|---|---|---|---|"]
        for r in sft:
            pre = r["pretraining"]
            stability = "-" if r["routing_stability"] is None else f"{r['routing_stability']:.1%}"
            out.append(f"| {r['route_on']} | {r['replay']:g} | {r['mixture_sft']:.2f} | {r['dense_sft']:.2f} | "
                       f"{pre['mixture']:.2f} -> {pre['mixture_sft']:.2f} | {pre['dense']:.2f} -> "
                       f"{pre['dense_sft']:.2f} | {stability} |")
        for replay in sorted({r["replay"] for r in sft}):
            best = min((r for r in sft if r["replay"] == replay), key=lambda r: r["mixture_sft"])
            out.append(f"- replay {replay:g}: lower mixture SFT perplexity with route_on = {best['route_on']}")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--sft-data", default="runs/demo-sft")
    ap.add_argument("--root", default="runs/demo-choices")
    ap.add_argument("--json", default="benchmarks/results/demo_choices.json")
    ap.add_argument("--temperatures", nargs="+", type=float, default=TEMPERATURES,
                    help="with --final: the temperatures chosen on validation")
    ap.add_argument("--final", action="store_true", help="the test split, once, for the final table")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    path = Path(args.json if not args.final else args.json.replace(".json", "_final.json"))
    result = json.loads(path.read_text()) if path.is_file() else {}
    if args.table_only:
        print(table(result))
        return 0
    run, root = Path(args.run), Path(args.root)
    if not (run / "eval" / "results.json").is_file():
        print(f"{run}: not a finished run (run `make demo` first; skipped)")
        return 0
    rows = top_k_rows(run, root, args.final, args.temperatures)
    if rows is not None:
        result["top_k"] = rows
    if not args.final:
        result["sft"] = [r for route_on, replay in SFT_SETTINGS
                         if (r := sft_row(run, Path(args.sft_data), root, route_on, replay)) is not None]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
