"""What the corpus10 studies share: one `smalltalk run` of configs/corpus10.yaml and its results, chosen on
validation (`final`: the test split, evaluated once by `smalltalk eval --final`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from smalltalk.cli import main as smalltalk

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "corpus10"


def share_experts_only_dense(run: Path, donor: Path | None) -> None:
    """Copy `donor`'s dense model matched to the experts' FLOPs only: it depends on data, model, train and E
    alone, so runs that share them train it once (the one matched in full pays for each run's routing)."""
    source = donor / "dense" / "matched-experts" if donor is not None else None
    if source is not None and (source / "train_manifest.json").is_file() and \
            not (run / "dense" / "matched-experts").exists():
        (run / "dense").mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, run / "dense" / "matched-experts")


UNTIL_EXPERTS = ("tokenizer", "data", "routers", "partition", "experts")


def fork_until_experts(source: Path, run: Path) -> None:
    """Start `run` from `source`'s artifacts up to its trained experts (hard links: stages replace files,
    never edit them), for a row that differs only after the experts (refine). No-op until `source`'s
    experts are done, or once `run` exists."""
    stages = source / "stages.json"
    if run.exists() or not (source / "mixture.json").is_file() or not stages.is_file():
        return
    done = {k: v for k, v in json.loads(stages.read_text()).items() if k in UNTIL_EXPERTS}
    if set(done) != set(UNTIL_EXPERTS):
        return
    tmp = run.with_name(run.name + ".forking")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in (*UNTIL_EXPERTS[:-1], "experts", "mixture.json"):
        if (source / name).is_dir():
            shutil.copytree(source / name, tmp / name, copy_function=os.link)
        else:
            os.link(source / name, tmp / name)
    shutil.copy2(source / "config.json", tmp / "config.json")  # the run's settings (refine reads routing.train)
    (tmp / "stages.json").write_text(json.dumps(done, indent=1))
    tmp.rename(run)


def run_and_results(run: Path, overrides: list[str], final: bool = False) -> dict | None:
    """The results of `run` after (re)running it; None if a stage failed. Refuses a split other than the
    one asked for: a study's choices come from validation, its final table from test."""
    code = smalltalk(["run", "--config", str(ROOT / "configs" / "corpus10.yaml"), "--run", str(run),
                      *[x for o in overrides for x in ("--set", o)]])
    if code == 0 and final and not (run / "eval-final" / "results.json").is_file():
        code = smalltalk(["eval", "--run", str(run), "--final"])
    if code != 0:
        print(f"{run.name}: failed ({code})", flush=True)
        return None
    results = json.loads((run / ("eval-final" if final else "eval") / "results.json").read_text())
    if results["split"] != ("test" if final else "validation"):
        raise SystemExit(f"{run}: results on the {results['split']} split; studies decide on validation (a run "
                         "made before issue #27 evaluated test: rerun it in a fresh --root), --final for test")
    return results
