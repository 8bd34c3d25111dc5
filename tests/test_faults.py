"""Faults: `smalltalk run` SIGKILLed (the whole process group) at a random moment inside every stage and
every EM round, then run again, must end with the artifacts of an uninterrupted run and nothing
half-written left behind."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from smalltalk.fsutil import KILL_AT, KILLED_MARK
from smalltalk.run.pipeline import STAGE_NAMES

from .conftest import ROOT, TINY_CONFIG

pytestmark = pytest.mark.slow

# The seed rotates with the date, so that the kills move from day to day; a failure names it, and
# SMALLTALK_FAULT_SEED=N reruns exactly those kill times.
SEED = int(os.environ.get("SMALLTALK_FAULT_SEED", time.strftime("%Y%m%d")))
VOLATILE = {"seconds", "mb_per_s", "tokens_per_s", "mfu", "time", "started", "ended", "pid", "command",
            "train_seconds", "train_mb_per_s", "timing", "peak_flops", "returncode", "error", "state"}


def _command(run: Path, corpus: Path, instructions: Path) -> list[str]:
    return [sys.executable, "-m", "smalltalk.cli", "run", "--config", str(TINY_CONFIG), "--run", str(run),
            "--set", f"data.inputs=[{corpus}]", "--set", "data.max_docs=null", "--set", "routing.chunk=240",
            "--set", "routing.experts=3", "--set", "routing.rounds=3", "--set", "sft.enabled=true",
            "--set", f"sft.data={instructions}", "--set", "sft.micro_batch_size=8", "--set", "refine.sequences=96",
            "--set", "experts.init=trunk", "--set", "train.checkpoint_every=5"]  # a trunk stage to be killed in


ROUNDS = 3  # EM rounds of the command below: each is a place to be killed in, like a stage
POINTS = [p for stage in STAGE_NAMES for p in ([stage] if stage != "routers" else
                                               [f"routers round {r}" for r in range(ROUNDS)])]


def _point(line: str, run: Path) -> str | None:
    """The kill point a line of `smalltalk run` output opens: a stage, or the next EM round (a resumed EM
    starts at the first round its history lacks)."""
    for stage in STAGE_NAMES:
        if line.startswith(f"[{stage}] running"):
            if stage != "routers":
                return stage
            history = run / "routers" / "em_history.json"
            done = len(json.loads(history.read_text())["rounds"]) if history.is_file() else 0
            return f"routers round {done}"
    if line.startswith('{"round": '):  # EM prints a summary as each round ends: the next one starts
        finished = json.loads(line)["round"]
        return f"routers round {finished + 1}" if finished + 1 < ROUNDS else None
    return None


def _run_until(cmd: list[str], run: Path, stages: list[str], delays: dict[str, float]) -> str | None:
    """Start the pipeline; when it opens one of the kill points `stages`, SIGKILL its whole process group
    that point's delay later. The point running at the kill, or None if the pipeline finished first."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    current: list[str] = []
    seen = threading.Event()

    def watch() -> None:
        for line in proc.stdout:
            point = _point(line, run)
            if point is not None:
                current.append(point)
                if point in stages:
                    seen.set()

    threading.Thread(target=watch, daemon=True).start()
    while proc.poll() is None and not seen.wait(0.02):
        pass
    if proc.poll() is None:
        time.sleep(delays[current[-1]])
    if proc.poll() is not None:
        return None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return current[-1]


def _normalised(path: Path, run: Path):
    if path.suffix == ".json":
        return _strip(json.loads(path.read_text().replace(str(run), "RUN")))
    if path.suffix == ".jsonl":
        return [_strip(json.loads(x)) for x in path.read_text().splitlines() if x.strip()]
    return path.read_bytes()


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _artifacts(run: Path) -> dict[str, object]:
    def kept(rel: str) -> bool:  # job records hold pids and times; report.md/html, results.md print timings
        return not rel.startswith("jobs/") and not rel.endswith((".log", "report/report.md", "report/index.html",
                                                                 "results.md"))

    return {p.relative_to(run).as_posix(): _normalised(p, run) for p in sorted(run.rglob("*"))
            if p.is_file() and kept(p.relative_to(run).as_posix())}


def _kill_pass(command: list[str], run: Path, aims: list[str], seconds: dict[str, float], rng: random.Random,
               scale: float) -> list[tuple[str, float]]:
    """One run directory: a kill at a seeded random moment of each aimed point in turn (anywhere in `scale` x
    its usual time: the end of a stage, where final models and manifests are written, is aimed at too), then
    a run to the end. The (point, delay) of every kill that landed."""
    killed, remaining = [], list(aims)
    while remaining:
        delays = {point: scale * rng.uniform(0.0, seconds[point]) for point in POINTS}
        landed = _run_until(command, run, remaining, delays)
        if landed is None:
            break
        killed.append((landed, round(delays[landed], 2)))
        remaining = remaining[remaining.index(landed) + 1:] if landed in remaining else remaining
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, timeout=900)
    return killed


@pytest.fixture(scope="module")
def reference(corpus_file, instructions, tmp_path_factory) -> Path:
    """The uninterrupted run every killed one must end equal to."""
    ref = tmp_path_factory.mktemp("faults") / "ref"
    subprocess.run(_command(ref, corpus_file, instructions), check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                   timeout=900)
    return ref


def test_sigkill_in_every_stage_then_rerun_gives_the_uninterrupted_artifacts(reference, corpus_file, instructions,
                                                                              tmp_path):
    """Every stage and every EM round is killed at least once. A kill can land past the point it aimed at
    (the stage ended first): such points are aimed at again in a fresh run directory with shorter delays,
    up to seven more times (each halving the delays: a stage that ran faster than in the reference is still hit),
    and the test fails naming any point never hit."""
    ref = reference
    print(f"fault seed {SEED} (SMALLTALK_FAULT_SEED={SEED} reproduces these kills)")
    rng = random.Random(SEED)
    seconds = {name: row["seconds"] for name, row in json.loads((ref / "stages.json").read_text()).items()}
    seconds |= {f"routers round {r}": seconds["routers"] / ROUNDS for r in range(ROUNDS)}
    want = _artifacts(ref)
    missing, history = list(POINTS), []
    for attempt in range(8):
        run = tmp_path / f"killed-{attempt}"
        killed = _kill_pass(_command(run, corpus_file, instructions), run, missing, seconds, rng, 0.5 ** attempt)
        history.append(killed)
        leftovers = [p for p in run.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
        assert not leftovers, f"seed {SEED}, kills {killed}: half-written files left: {leftovers}"
        got = _artifacts(run)
        assert sorted(want) == sorted(got), f"seed {SEED}, kills {killed}"
        differ = [name for name in want if want[name] != got[name]]
        assert not differ, f"seed {SEED}, kills {killed}: differ from an uninterrupted run: {differ}"
        assert (run / "report" / "report.md").is_file()
        missing = [point for point in missing if point not in {p for p, _ in killed}]
        if not missing:
            break
    assert not missing, f"seed {SEED}: never killed inside {missing} (kills per attempt: {history})"


# Pinned moments, in the order the pipeline reaches them: before a temp directory is renamed into place (the
# data, the partition, a refined router's model), between an artifact and its manifest (the trunk's model is
# in place, its train_manifest.json not yet), before mixture.json and before the eval's results.json land.
PINNED_KILLS = ["dir:data", "file:train_manifest.json", "dir:partition", "file:mixture.json", "dir:model",
                "file:results.json"]


def test_sigkill_at_pinned_moments_of_a_write_then_rerun_gives_the_uninterrupted_artifacts(reference, corpus_file,
                                                                                            instructions, tmp_path):
    """Each run of `smalltalk run` is SIGKILLed by itself at the next pinned moment (fsutil.kill_point); the
    run after the last kill ends with the artifacts of the uninterrupted run and no half-written file."""
    run = tmp_path / "pinned"
    command = _command(run, corpus_file, instructions)
    mark = tmp_path / "killed"
    for point in PINNED_KILLS:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900,
                              env={**os.environ, KILL_AT: point, KILLED_MARK: str(mark)})
        assert mark.is_file() and done.returncode != 0, f"{point}: never reached (exit {done.returncode}): " + (
            done.stdout + done.stderr)[-1500:]  # the killed process: the pipeline's, or a job it started
        mark.unlink()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, timeout=900)
    leftovers = [p for p in run.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert not leftovers, leftovers
    want, got = _artifacts(reference), _artifacts(run)
    assert sorted(want) == sorted(got)
    assert not [name for name in want if want[name] != got[name]]
