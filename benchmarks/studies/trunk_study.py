"""Experts that branch from a shared trunk (issue #31), studied on validation.

For each corpus and E, a scratch run (experts.init=scratch: the paper) is the base: it trains the dense
model matched in full and the ~E x bigger dense model at equal training FLOPs. Each trunk fraction f forks
the base's tokenizer, data, routers and partition (hard links), then trains the trunk (f of the experts'
E x train.steps budget, on the whole train split), the experts from it ((1 - f) x train.steps each) and the
dense model matched in full from the same trunk. Total training FLOPs are the base's (the bigger model's
budget): trunk + experts = the scratch experts' FLOPs exactly when f x E x steps is whole.

Reported per row, at the main prefix after M̂ (validation): the mixture's perplexity, ÷ the dense model
matched in full from the same start, and the share of the gap between the scratch mixture and the bigger
dense model that the trunk closes: (mix(0) − mix(f)) / (mix(0) − bigger). The issue's target: some f beats
scratch at both E and closes at least a third of that gap.

`--pretrained`: the pretrained start on the same corpora. A Llama of the experts' architecture is pretrained
here (no download) on the *other* corpus (demo <-> corpus10) with its own tokenizer, for E x train.steps
steps; the target run continues every expert and the dense model matched in full from it
(experts.init=pretrained: the run's tokenizer is the checkpoint's), and a scratch run with the same tokenizer,
forked at its partition, is its reference. The bigger dense model has no fair pretrained counterpart.

Corpora: `demo` (configs/demo.yaml: the corpus `make demo` builds, RUN runs/demo-corpus; its bases are trained
here: since `make demo` runs the trunk start this study chose, runs/demo is no scratch row) and `corpus10`
(configs/corpus10.yaml, runs/corpus10-data; its bases are forked from benchmarks/studies/evidence_corpus10.py's
`default` rows, seed 0, once their dense models are done, so only the bigger dense model is trained here).
Finished rows are skipped; rows go to --json as they finish, the figure to --plot at the end (validation only).
`--final` evaluates the test split of finished runs once.

  python benchmarks/studies/trunk_study.py [--corpora demo corpus10] [--experts 4 8] [--fractions 0.1 0.25 0.5]
      [--root runs/trunk-study] [--json benchmarks/results/trunk_study.json] [--pretrained] [--final]
      [--plot docs/trunk_study.png] [--table-only]

Data: `smalltalk corpus corpus10 runs/corpus10-data --install` builds corpus10 (docs/corpus10.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from corpus10_runs import CORPUS, PRE27_ROUTING, ROOT, fork_stages, run_and_results, set_flags

from smalltalk.cli import main as smalltalk
from smalltalk.config import load_config

CONFIGS = {"demo": ROOT / "configs" / "demo.yaml", "corpus10": ROOT / "configs" / "corpus10.yaml"}
INPUTS = {"demo": ROOT / "runs" / "demo-corpus", "corpus10": CORPUS}
MAIN_PREFIX = 64
UNTIL_PARTITION = ("tokenizer", "data", "routers", "partition")
STUDY = ["sft.enabled=false", "dense.experts_only=false"]  # what no row of this study reads
# the routing every row of this study was measured with, pinned so that a change of the configs' routing
# default cannot move the study's split (or its donors' digests) silently
STUDY += PRE27_ROUTING


def _run(run: Path, corpus: str, overrides: list[str], final: bool) -> dict | None:
    """The row's figures after M̂ (the demo keeps demo.yaml's relative data path: runs/demo's digests name it)."""
    inputs = [] if corpus == "demo" else [f"data.inputs=[{INPUTS[corpus]}]"]
    results = run_and_results(run, [*STUDY, *inputs, *overrides], final, CONFIGS[corpus])
    return None if results is None else next(r for r in results["sweep"] if r["prefix"] == MAIN_PREFIX)


def donor_run(corpus: str, experts: int, grid: Path) -> Path | None:
    """A finished run of the same config to fork the scratch row from instead of retraining it: for corpus10
    the evidence grid's `default` row, seed 0 (PRE27_ROUTING, scratch experts; its stage digests equal this
    study's up to the experts, checked by `smalltalk run`). None for the demo: runs/demo branches from a trunk."""
    return None if corpus == "demo" else grid / f"E{experts}-default-s0"


def base_run(root: Path, corpus: str, experts: int, final: bool, grid: Path) -> dict | None:
    """The scratch mixture, its dense model matched in full and the bigger dense model."""
    run = root / f"{corpus}-E{experts}-scratch"
    donor = donor_run(corpus, experts, grid)
    if donor is not None and not run.exists():
        if not (donor / "dense" / "matched" / "train_manifest.json").is_file():
            print(f"{corpus} E = {experts}: waiting for {donor} to finish its dense model (skipped)", flush=True)
            return None
        fork_stages(donor, run, (*UNTIL_PARTITION, "experts"))
        for kind in ("matched", "bigger") if run.is_dir() else ():  # finished dense models resume as done
            if (donor / "dense" / kind).is_dir():  # (same budgets)
                shutil.copytree(donor / "dense" / kind, run / "dense" / kind, copy_function=os.link)
    main = _run(run, corpus, [f"routing.experts={experts}", "dense.bigger=true", "experts.init=scratch"], final)
    if main is None:
        return None
    return {"mixture": main["mixture_after"]["ppl"], "dense": main["dense_matched_after"]["ppl"],
            "bigger": main["dense_bigger_after"]["ppl"]}


def trunk_run(root: Path, corpus: str, experts: int, fraction: float, final: bool,
              mixture_only: bool = False) -> dict | None:
    base, run = root / f"{corpus}-E{experts}-scratch", root / f"{corpus}-E{experts}-trunk{fraction:g}"
    fork_stages(base, run, UNTIL_PARTITION)
    if not run.is_dir():
        return None
    overrides = [f"routing.experts={experts}", "experts.init=trunk", f"experts.trunk_fraction={fraction}",
                 "dense.bigger=false"]
    if mixture_only:
        return _mixture_only(run, corpus, overrides)
    main = _run(run, corpus, overrides, final)
    if main is None:
        return None
    return {"mixture": main["mixture_after"]["ppl"], "dense": main["dense_matched_after"]["ppl"]}


def _mixture_only(run: Path, corpus: str, overrides: list[str]) -> dict | None:
    """The trunk, the experts and the mixture's validation figure, before the dense model (the longest job):
    what the target needs. The same stages as `smalltalk run`'s, which later finishes the row from them."""
    common = ["--config", str(CONFIGS[corpus]), "--run", str(run),
              *set_flags([*STUDY, *overrides])]
    out = run / "eval-mixture-only"
    for verb in (["trunk", "train"], ["experts", "train", "--all"], ["eval", "--out", str(out)]):
        if verb[0] == "eval" and (out / "results.json").is_file():
            continue
        if smalltalk([*verb, *common]) != 0:
            return None
    results = json.loads((out / "results.json").read_text())
    assert results["split"] == "validation", run
    main = next(r for r in results["sweep"] if r["prefix"] == MAIN_PREFIX)
    return {"mixture": main["mixture_after"]["ppl"], "dense": None}


def pretrained_checkpoint(root: Path, corpus: str, experts: int) -> Path | None:
    """A Llama of `corpus`'s experts' architecture pretrained on the other corpus, as a checkpoint directory
    (weights + its tokenizer): what a user brings."""
    other = "corpus10" if corpus == "demo" else "demo"
    ckpt, run = root / f"pretrained-on-{other}-for-{corpus}", root / f"pretrain-on-{other}-for-{corpus}"
    if (ckpt / "config.json").is_file():
        return ckpt
    common = ["--config", str(CONFIGS[corpus]), "--run", str(run), "--set", f"data.inputs=[{INPUTS[other]}]",
              "--set", "tokenizer.max_train_chars=20000000"]
    steps = f"train.steps={experts * load_config(CONFIGS[corpus]).train.steps}"  # the E experts' steps
    for verb in (["tokenizer", "train"], ["data", "prepare"]):
        if not (run / verb[0] / "manifest.json").is_file() and smalltalk([*verb, *common]) != 0:
            return None
    if smalltalk(["train", "lm", *common, "--set", steps, "--set", "train.progress=false", "--resume"]) != 0:
        return None
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(run / "lm" / "model", tmp)
    for f in (run / "tokenizer").iterdir():
        if f.name != "manifest.json":
            shutil.copy2(f, tmp / f.name)
    tmp.rename(ckpt)
    return ckpt


def pretrained_rows(root: Path, corpus: str, experts: int, final: bool) -> list[dict]:
    """The mixture and its dense model from the pretrained checkpoint, and from scratch with its tokenizer."""
    ckpt = pretrained_checkpoint(root, corpus, experts)
    if ckpt is None:
        return []
    run = root / f"{corpus}-E{experts}-pretrained"
    common = [f"routing.experts={experts}", "dense.bigger=false", f"tokenizer.pretrained={ckpt}"]  # one digest
    main = _run(run, corpus, [*common, "experts.init=pretrained", f"experts.pretrained={ckpt}"], final)
    if main is None:
        return []
    rows = [{"start": "pretrained", "mixture": main["mixture_after"]["ppl"],
             "dense": main["dense_matched_after"]["ppl"]}]
    scratch = root / f"{corpus}-E{experts}-scratch-same-tokenizer"
    fork_stages(run, scratch, UNTIL_PARTITION)  # same tokenizer, data, routers, partition
    main = _run(scratch, corpus, [*common, "experts.init=scratch"], final)
    if main is None:
        return rows
    return rows + [{"start": "scratch (same tokenizer)", "mixture": main["mixture_after"]["ppl"],
                    "dense": main["dense_matched_after"]["ppl"]}]


def pretrained_table(rows: list[dict]) -> str:
    out = ["", "pretrained start (the other corpus's Llama, its tokenizer), perplexity after M̂ = "
           f"{MAIN_PREFIX}:", "", "| corpus | E | experts start | mixture | dense matched (same start) | ÷ dense |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['corpus']} | {r['experts']} | {r['start']} | {r['mixture']:.2f} | {r['dense']:.2f} | "
                   f"{r['mixture'] / r['dense']:.3f} |")
    return "\n".join(out)


def table(all_rows: list[dict]) -> str:
    rows = [r for r in all_rows if "fraction" in r]
    split = all_rows[0]["split"] if all_rows else "validation"
    out = [f"{split} split, perplexity after M̂ = {MAIN_PREFIX}; every row at the same total training FLOPs",
           "", "| corpus | E | trunk fraction | mixture | dense matched (same start) | mixture ÷ dense | "
           "bigger dense (scratch) | gap to bigger closed |", "|---|---|---|---|---|---|---|---|"]
    bases = {(r["corpus"], r["experts"]): r for r in rows if r["fraction"] == 0}
    for r in sorted(rows, key=lambda r: (r["corpus"], r["experts"], r["fraction"])):
        base = bases.get((r["corpus"], r["experts"]))
        bigger = base["bigger"] if base else float("nan")
        closed = (base["mixture"] - r["mixture"]) / (base["mixture"] - bigger) if base else float("nan")
        dense, ratio = ("not yet", "-") if r["dense"] is None else \
            (f"{r['dense']:.2f}", f"{r['mixture'] / r['dense']:.3f}")
        out.append(f"| {r['corpus']} | {r['experts']} | {r['fraction']:g} | {r['mixture']:.2f} | {dense} | {ratio} | "
                   f"{bigger:.2f} | {closed:+.0%} |")
    out += ["", "target: a fraction below scratch at both E, closing at least a third of the gap to the bigger model:"]
    for (corpus, experts), base in sorted(bases.items()):
        trunks = [r for r in rows if (r["corpus"], r["experts"]) == (corpus, experts) and r["fraction"] > 0]
        if not trunks:
            continue
        best = min(trunks, key=lambda r: r["mixture"])
        closed = (base["mixture"] - best["mixture"]) / (base["mixture"] - base["bigger"])
        verdict = "met" if best["mixture"] < base["mixture"] and closed >= 1 / 3 else "MISSED"
        out.append(f"- {corpus} E = {experts}: best f = {best['fraction']:g}, {best['mixture']:.2f} vs scratch "
                   f"{base['mixture']:.2f}, {closed:.0%} of the gap to {base['bigger']:.2f} closed: {verdict}")
    pretrained = [r for r in all_rows if "start" in r]
    return "\n".join(out) + (pretrained_table(pretrained) if pretrained else "")


def plot(all_rows: list[dict], path: Path) -> None:
    """Perplexity against the trunk fraction, one panel per (corpus, E): the mixture, the dense model matched
    in full from the same start, and the bigger dense model (scratch) as the line to close the gap to."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in all_rows if "fraction" in r]
    panels = sorted({(r["corpus"], r["experts"]) for r in rows})
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (corpus, experts) in zip(axes[0], panels, strict=True):
        mine = sorted((r for r in rows if (r["corpus"], r["experts"]) == (corpus, experts)),
                      key=lambda r: r["fraction"])
        ax.plot([r["fraction"] for r in mine], [r["mixture"] for r in mine], "o-", label="mixture")
        dense = [r for r in mine if r["dense"] is not None]
        ax.plot([r["fraction"] for r in dense], [r["dense"] for r in dense], "s--", label="dense matched in full")
        bigger = next((r["bigger"] for r in mine if r["fraction"] == 0 and r.get("bigger")), None)
        if bigger is not None:
            ax.axhline(bigger, color="tab:red", ls=":", label="bigger dense (scratch)")
        ax.set_title(f"{corpus}, E = {experts} ({mine[0]['split']})")
        ax.set_xlabel("trunk fraction of the experts' budget")
        ax.set_ylabel(f"perplexity after M̂ = {MAIN_PREFIX}")
    axes[0][0].legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/trunk-study")
    ap.add_argument("--corpora", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--experts", nargs="+", type=int, default=[4, 8])
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.25, 0.1, 0.5])
    ap.add_argument("--json", default="benchmarks/results/trunk_study.json")
    ap.add_argument("--grid", default="runs/evidence", help="evidence_corpus10.py's root: corpus10's "
                    "scratch rows fork its default row, seed 0")
    ap.add_argument("--pretrained", action="store_true", help="the pretrained start instead of trunk fractions")
    ap.add_argument("--mixture-only", action="store_true", help="trunk rows up to the mixture's figure, the dense "
                    "model left for a later pass (which replaces the row)")
    ap.add_argument("--final", action="store_true", help="the test split of every finished run, once")
    ap.add_argument("--plot", default="docs/trunk_study.png", help="the figure of the validation table")
    ap.add_argument("--table-only", action="store_true", help="print the table of --json and plot it, run nothing")
    args = ap.parse_args()
    path = Path(args.json if not args.final else args.json.replace(".json", "_final.json"))
    done = json.loads(path.read_text())["rows"] if path.is_file() else []
    if args.table_only:
        print(table(done))
        if not args.final:
            plot(done, Path(args.plot))
        return 0
    seen = {(r["corpus"], r["experts"], r.get("fraction", r.get("start"))) for r in done
            if r.get("dense") is not None or args.mixture_only or r.get("fraction") == 0}
    for corpus in args.corpora:
        if not INPUTS[corpus].is_dir():
            print(f"{corpus}: no corpus at {INPUTS[corpus]} (skipped; `make demo` builds the demo's)")
            continue
        for experts in args.experts:
            if args.pretrained:
                if (corpus, experts, "pretrained") not in seen:
                    split = "test" if args.final else "validation"
                    done += [{"corpus": corpus, "experts": experts, "split": split, **r}
                             for r in pretrained_rows(Path(args.root), corpus, experts, args.final)]
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps({"rows": done}, indent=1))
                continue
            for fraction in [0.0, *args.fractions]:
                if (corpus, experts, fraction) in seen:
                    continue
                started = time.perf_counter()
                result = base_run(Path(args.root), corpus, experts, args.final, Path(args.grid)) if fraction == 0 else \
                    trunk_run(Path(args.root), corpus, experts, fraction, args.final, args.mixture_only)
                if result is None:
                    continue
                key = (corpus, experts, fraction)  # a mixture-only row is replaced by the finished one
                done = [r for r in done if (r["corpus"], r["experts"], r.get("fraction")) != key]
                done.append({"corpus": corpus, "experts": experts, "fraction": fraction,
                             "split": "test" if args.final else "validation", **result,
                             "minutes": round((time.perf_counter() - started) / 60, 1)})
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"rows": done}, indent=1))
                print(table(done), flush=True)
    print(table(done))
    if not args.final:
        plot(done, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
