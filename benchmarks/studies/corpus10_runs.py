"""What the corpus10 studies share: one `smalltalk run` of configs/corpus10.yaml and its results, chosen on
validation (`final`: the test split, evaluated once by `smalltalk eval --final`)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from smalltalk.cli import main as smalltalk
from smalltalk.fsutil import pid_alive, write_json
from smalltalk.host import usable_cores

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "runs" / "corpus10-data"  # built by the project: BUILD_CORPUS
BUILD_CORPUS = f"smalltalk corpus corpus10 {CORPUS.relative_to(ROOT)} --install"
RESULTS = ROOT / "benchmarks" / "results"  # the grids' rows, committed
# the routing configs/{demo,corpus10}.yaml ran before issue #27 (the grid's `default` row; the trunk study's)
PRE27_ROUTING = ["routing.method=em", "routing.init_split=tfidf", "routing.router_init=shared",
                 "routing.share_passes=null"]


def share_experts_only_dense(run: Path, donor: Path | None, free_routing: bool = False) -> None:
    """Copy `donor`'s dense model matched to the experts' FLOPs only: it depends on data, model, train and E
    alone, so runs that share them train it once (the one matched in full pays for each run's routing).
    `free_routing`: `run`'s routing costs no model FLOPs (tf-idf, random, oracle), so its dense model matched
    in full is that same model, copied too; `check_copied_dense` verifies it once the run is done."""
    source = donor / "dense" / "matched-experts" if donor is not None else None
    if source is None or not (source / "train_manifest.json").is_file():
        return
    for kind in ("matched-experts", "matched") if free_routing else ("matched-experts",):
        if not (run / "dense" / kind).exists():
            (run / "dense").mkdir(parents=True, exist_ok=True)
            shutil.copytree(source, run / "dense" / kind)


# The configs' routing of 2026-12-07, pinned by both grids' rows: a row keeps its meaning (and its runs their
# digests) when the configs' default routing changes to the rule's choice.
LM_EM = ["routing.method=em", "routing.init_split=tfidf", "routing.router.preset=cpu-router-0.03m",
         "routing.ngram_order=2"]


def share_matched_dense(run: Path, twin: Path, kind: str = "matched") -> None:
    """Copy `twin`'s dense model `kind` (matched in full, or matched at inference) into `run`, whose routing
    costs the same FLOPs by construction (rows that differ only in how round 0 is split, or in the order of
    n-gram routers); `check_copied_dense` verifies the match in full."""
    source = twin / "dense" / kind
    if (source / "train_manifest.json").is_file() and not (run / "dense" / kind).exists():
        (run / "dense").mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, run / "dense" / kind)


def check_copied_dense(results: dict, run: Path, source: Path) -> None:
    """Refuse a row whose dense model matched in full, copied from `source`, is not its match: trained for
    other steps than the copy (the trainer resumed it to more), or with a budget other than this run's whole
    budget (rounded to a whole step it is within 1e-3; a wrong copy is off by the routing overhead, several %).
    A source deleted since (its row written, its disk wanted back) leaves the budget check alone to decide."""
    ratio = results["flops"]["exact"]["dense_budget_ratio"]["matched"]
    dirs = [d for d in (run / "dense" / "matched", source) if (d / "train_manifest.json").is_file()]
    steps = [json.loads((d / "train_manifest.json").read_text())["steps"] for d in dirs]
    if abs(ratio - 1) > 1e-3 or len(set(steps)) > 1:
        copy = f"the copy {steps[-1]}" if len(steps) > 1 else "the copy's source deleted"
        raise SystemExit(f"{run}: the dense model copied from {source} has {ratio:.4f}x this run's training FLOPs "
                         f"({steps[0]} steps, {copy}): it is not its match in full; delete "
                         "dense/matched and rerun")


UNTIL_EXPERTS = ("tokenizer", "data", "routers", "partition", "experts")
STAGE_FILES = {"experts": ("experts", "mixture.json")}  # a stage's files other than its directory of that name


def fork_until_experts(source: Path, run: Path) -> None:
    """Start `run` from `source`'s artifacts up to its trained experts, for a row that differs only after the
    experts (refine)."""
    fork_stages(source, run, UNTIL_EXPERTS)


def fork_stages(source: Path, run: Path, stages: tuple[str, ...]) -> None:
    """Start `run` from `source`'s artifacts of `stages` (hard links: stages replace files, never edit them);
    `smalltalk run` then checks their digests against its config and runs the rest. No-op until all of
    them are done in `source`, or once `run` exists."""
    record = source / "stages.json"
    if run.exists() or not record.is_file():
        return
    done = {k: v for k, v in json.loads(record.read_text()).items() if k in stages}
    if set(done) != set(stages) or ("experts" in stages and not (source / "mixture.json").is_file()):
        return
    tmp = run.with_name(run.name + ".forking")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in (f for stage in stages for f in STAGE_FILES.get(stage, (stage,))):
        if (source / name).is_dir():
            shutil.copytree(source / name, tmp / name, copy_function=os.link)
        elif (source / name).is_file():
            os.link(source / name, tmp / name)
    shutil.copy2(source / "config.json", tmp / "config.json")  # the run's settings (refine reads routing.train)
    (tmp / "stages.json").write_text(json.dumps(done, indent=1))
    tmp.rename(run)


def set_flags(overrides: list[str]) -> list[str]:
    """`--set` before each override: how the studies hand their overrides to the CLI."""
    return [x for o in overrides for x in ("--set", o)]


def run_and_results(run: Path, overrides: list[str], final: bool = False,
                    config: Path = ROOT / "configs" / "corpus10.yaml") -> dict | None:
    """The results of `run` after (re)running it with `config`; None if a stage failed. Refuses a split
    other than the one asked for: a study's choices come from validation, its final table from test."""
    code = smalltalk(["run", "--config", str(config), "--run", str(run),
                      *set_flags(overrides)])
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


def claim(root: Path, name: str) -> bool:
    """Claim run `name` for this process, so that several processes can work through one grid on one machine
    (one per core): True if it was free or its claimant is dead (killed; the run resumes from its files)."""
    claims = root / ".claims"
    claims.mkdir(parents=True, exist_ok=True)
    mark = claims / name
    with contextlib.suppress(FileNotFoundError, ValueError):
        pid = int(mark.read_text())
        if pid != os.getpid() and pid_alive(pid):
            return False
        mark.unlink()
    try:
        fd = os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:  # another process claimed it between the check and now
        return False
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def claimed_by_other(root: Path, name: str) -> bool:
    with contextlib.suppress(FileNotFoundError, ValueError):
        pid = int((root / ".claims" / name).read_text())
        return pid != os.getpid() and pid_alive(pid)
    return False


def release(root: Path, name: str) -> None:
    (root / ".claims" / name).unlink(missing_ok=True)


@contextlib.contextmanager
def locked_rows(path: Path) -> Iterator[list[dict]]:
    """The rows of results file `path`, read and written under an exclusive lock (processes sharing a grid
    append to one file): append to the list yielded; it is written back atomically on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = json.loads(path.read_text())["rows"] if path.is_file() else []
        before = len(rows)
        yield rows
        if len(rows) != before:
            write_json(path, {"rows": rows})


def mean_sd(values: list[float]) -> str:
    """A row's figure over its seeds, as every study table prints it."""
    if len(values) == 1:
        return f"{values[0]:.3f} (1 seed)"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def corpus_missing(corpus: Path = CORPUS) -> bool:
    """True (and says how to build it) when the evidence corpus is not there: a study then runs nothing."""
    if (corpus / "stats.json").is_file():
        return False
    print(f"corpus10 not found at {corpus}: build it with `{BUILD_CORPUS}` (skipping)")
    return True


Job = tuple  # (E, row, seed) or a study's own key; run_name(*job) names its run directory


def work_through(jobs: list[Job], root: Path, path: Path, run_name: Callable[..., str],
                 run_one: Callable[..., dict | None], key: Callable[[dict], Job],
                 table: Callable[[list[dict]], str], ready: Callable[..., bool] = lambda *job: True) -> int:
    """The grid loop every corpus10 study shares: take the first pending job that is ready and free (processes
    on one machine claim runs, ROOT/.claims), run it, append its row to `path` under a lock, print the table;
    rows already in `path` are skipped, so a killed grid resumes. Returns 1 if any job failed."""
    if usable_cores() > 1:
        print(f"this grid process may use {usable_cores()} cores: when several share the machine, start each with "
              "OMP_NUM_THREADS=1 (or under taskset), or their threads oversubscribe the cores "
              "(docs/benchmarks.md)", flush=True)
    failed: set = set()
    while True:
        with locked_rows(path) as done:
            pending = [j for j in jobs if j not in {key(r) for r in done} | failed]
        if not pending:
            return 1 if failed else 0
        job = next((j for j in pending if ready(root, *j) and claim(root, run_name(*j))), None)
        if job is None:  # the rest are being run by other processes, or wait for them
            time.sleep(60)
            continue
        try:
            result = run_one(root, *job)
        finally:
            release(root, run_name(*job))
        if result is None:
            failed.add(job)
            continue
        with locked_rows(path) as done:
            done.append(result)
            rows = list(done)
        try:  # after the rows are written: a table this code cannot print (a row another version added) loses none
            print(table(rows), flush=True)
        except (KeyError, ValueError) as error:
            print(f"rows saved; the table is not printed here ({error!r}): print it with --table-only", flush=True)
