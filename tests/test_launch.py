"""The local launcher survives its own death, SLURM scripts run the same jobs, status shows failures."""

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import ROOT, TINY_CONFIG, cli

pytestmark = pytest.mark.slow
LONGER = ["--set", "train.steps=40", "--set", "train.checkpoint_every=10"]


def _fresh_copy(pipeline_run, dest):
    shutil.copytree(pipeline_run[0], dest, ignore=shutil.ignore_patterns("experts", "jobs", "dense", "eval"))
    return dest


def _launch_cmd(run, *extra):
    return [sys.executable, "-m", "smalltalk.cli", "launch", "--config", str(TINY_CONFIG), "--run", str(run),
            "--stage", "experts", "--parallel", "1", *LONGER, *extra]


def test_killed_launcher_relaunch_finishes_without_retraining(pipeline_run, tmp_path):
    ref = _fresh_copy(pipeline_run, tmp_path / "ref")
    subprocess.run(_launch_cmd(ref), check=True, cwd=ROOT, timeout=600)
    run = _fresh_copy(pipeline_run, tmp_path / "killed")
    launcher = subprocess.Popen(_launch_cmd(run), cwd=ROOT)
    deadline = time.time() + 120
    while not (run / "experts" / "00" / "checkpoints" / "step_00000020").exists():
        assert launcher.poll() is None and time.time() < deadline
        time.sleep(0.05)
    job = json.loads((run / "jobs" / "experts-00.json").read_text())
    os.kill(launcher.pid, signal.SIGKILL)  # the launcher dies ...
    os.kill(job["pid"], signal.SIGKILL)  # ... and so does its running expert (a machine restart)
    launcher.wait()
    time.sleep(0.5)
    subprocess.run(_launch_cmd(run), check=True, cwd=ROOT, timeout=600)
    log = (run / "jobs" / "experts-00.log").read_text()
    assert "resuming from" in log and "step_000000" in log, "expert 00 must resume, not restart"
    for k in range(3):
        assert json.loads((run / "jobs" / f"experts-{k:02d}.json").read_text())["state"] == "done"
        a = load_file(str(ref / "experts" / f"{k:02d}" / "model" / "model.safetensors"))
        b = load_file(str(run / "experts" / f"{k:02d}" / "model" / "model.safetensors"))
        assert all(torch.equal(a[n], b[n]) for n in a), f"expert {k} differs from the uninterrupted run"


def test_relaunch_reattaches_to_running_jobs(pipeline_run, tmp_path):
    """The launcher is SIGKILLed while expert 00 trains; the orphan is stopped (SIGSTOP), so it is provably alive
    when the relaunch looks; the relaunch says it re-attached, the orphan then continues (SIGCONT) and finishes
    under the same pid, never restarted; the weights equal an uninterrupted launch's."""
    from safetensors.torch import load_file

    ref = _fresh_copy(pipeline_run, tmp_path / "ref")
    subprocess.run(_launch_cmd(ref), check=True, cwd=ROOT, timeout=600, stdout=subprocess.DEVNULL)
    run = _fresh_copy(pipeline_run, tmp_path / "attach")
    launcher = subprocess.Popen(_launch_cmd(run), cwd=ROOT)
    deadline = time.time() + 120
    while not (run / "jobs" / "experts-00.json").exists():
        assert time.time() < deadline
        time.sleep(0.05)
    pid = json.loads((run / "jobs" / "experts-00.json").read_text())["pid"]
    os.kill(launcher.pid, signal.SIGKILL)  # the expert keeps running as an orphan
    launcher.wait()
    os.kill(pid, signal.SIGSTOP)  # alive for sure until the relaunch has looked
    relaunch = subprocess.Popen(_launch_cmd(run), cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        for line in relaunch.stdout:
            if line.startswith("expert 00: re-attached"):
                assert f"(pid {pid})" in line
                break
        else:
            raise AssertionError("the relaunch never re-attached to the running expert 00")
    finally:
        os.kill(pid, signal.SIGCONT)
    relaunch.stdout.read()
    assert relaunch.wait(timeout=600) == 0
    log = (run / "jobs" / "experts-00.log").read_text()
    assert "resuming from" not in log, "the running job was re-attached, not restarted"
    assert json.loads((run / "jobs" / "experts-00.json").read_text())["pid"] == pid
    for k in range(3):
        a, b = (load_file(str(r / "experts" / f"{k:02d}" / "model" / "model.safetensors")) for r in (ref, run))
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), k


def _processes_naming(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if text in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    pids.append(int(proc.name))
    return pids


def test_a_killed_dense_stage_leaves_no_job_behind_and_its_rerun_gives_the_same_weights(pipeline_run, tmp_path):
    """`smalltalk run` trains the dense baselines side by side as child jobs; SIGKILLed (the run alone, not its
    group: an OOM kill or a node's scheduler), its jobs die with it, and the rerun ends with the weights of
    the uninterrupted run."""
    from safetensors.torch import load_file

    src, args = pipeline_run
    run = tmp_path / "dense-killed"
    shutil.copytree(src, run, ignore=shutil.ignore_patterns("dense", "jobs"))
    command = [sys.executable, "-m", "smalltalk.cli", *[str(run) if a == src else str(a) for a in args]]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while len(_processes_naming(f"{run} --kind")) < 2:
        assert proc.poll() is None and time.time() < deadline, "the dense jobs never started side by side"
        time.sleep(0.05)
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while _processes_naming(f"{run} --kind"):
        assert time.time() < deadline, "dense jobs kept training after their stage was killed"
        time.sleep(0.05)
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, timeout=600)
    for kind in sorted(d.name for d in (src / "dense").iterdir()):
        a, b = (load_file(str(r / "dense" / kind / "model" / "model.safetensors")) for r in (src, run))
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), kind


def test_sbatch_script_runs_the_same_jobs_as_local(pipeline_run, tmp_path, capsys):
    run = _fresh_copy(pipeline_run, tmp_path / "slurm")
    assert cli("launch", "--config", TINY_CONFIG, "--run", run, "--stage", "experts", "--scheduler", "slurm") == 0
    script = (run / "jobs" / "experts.sbatch").read_text()
    subprocess.run(["bash", "-n", str(run / "jobs" / "experts.sbatch")], check=True)
    assert "#SBATCH --array=0-2" in script
    line = next(x for x in script.splitlines() if x.startswith("torchrun"))
    slurm_args = shlex.split(line.split("-m smalltalk.cli ", 1)[1])
    assert cli("launch", "--config", TINY_CONFIG, "--run", run, "--stage", "experts", "--parallel", "2") == 0
    local_only = ("train.num_threads=", "train.progress=")  # thread pinning differs per machine, not the job
    for k in range(3):
        local = shlex.split(json.loads((run / "jobs" / f"experts-{k:02d}.json").read_text())["command"])
        local = local[local.index("smalltalk.cli") + 1:]
        local = [a for i, a in enumerate(local) if not a.startswith(local_only)
                 and not (a == "--set" and i + 1 < len(local) and local[i + 1].startswith(local_only))]
        task = [a.replace("${SLURM_ARRAY_TASK_ID}", str(k)) for a in slurm_args]
        assert task == local


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs 2 cores to pin this process to one of them")
def test_launched_jobs_split_the_cores_this_process_may_use_not_the_machines(pipeline_run, tmp_path):
    """A launcher pinned to one core (taskset, SLURM's CPU binding) gives its one job one thread: split from
    os.cpu_count(), every pinned grid process ran as many threads as the machine has cores."""
    run = _fresh_copy(pipeline_run, tmp_path / "pinned")
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})
    try:
        assert cli("launch", "--config", TINY_CONFIG, "--run", run, "--stage", "experts", "--parallel", "1") == 0
    finally:
        os.sched_setaffinity(0, allowed)
    for k in range(3):
        command = json.loads((run / "jobs" / f"experts-{k:02d}.json").read_text())["command"]
        assert "train.num_threads=1 " in command, command


def test_a_process_given_one_thread_gives_its_jobs_one(monkeypatch):
    from smalltalk.host import threads_per_job, usable_cores

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the suite may itself run with one thread
    cores = usable_cores()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert usable_cores() == 1 and threads_per_job(1) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "64")  # more than the process has: its cores
    assert usable_cores() == cores and threads_per_job(2) == max(1, cores // 2)


def test_status_reports_a_failed_expert(pipeline_run, tmp_path, capsys):
    run = _fresh_copy(pipeline_run, tmp_path / "failing")
    (run / "partition" / "expert_01.npy").write_bytes(b"not a numpy file")
    assert cli("launch", "--config", TINY_CONFIG, "--run", run, "--stage", "experts", "--parallel", "2") == 2
    capsys.readouterr()
    assert cli("status", run, "--json") == 0
    status = json.loads(capsys.readouterr().out)
    states = {e["expert"]: e for e in status["experts"]}
    assert states[0]["state"] == "done" and states[2]["state"] == "done"
    assert states[1]["state"] == "failed" and states[1]["error"]
    assert status["stages"]["experts"] == "failed"
    assert cli("status", run) == 0
    assert "failed" in capsys.readouterr().out


def test_launch_partition_in_parts_gives_the_same_shares(pipeline_run, tmp_path):
    """Three part processes and a merge write the bytes one process writes; the SLURM form is an array of
    the same part commands plus a merge job."""
    run = _fresh_copy(pipeline_run, tmp_path / "parts")
    shutil.rmtree(run / "partition")
    ref = _fresh_copy(pipeline_run, tmp_path / "ref")
    assert cli("partition", "--run", ref, "--out", tmp_path / "one", "--set", "routing.partition_chunk=50") == 0
    subprocess.run([sys.executable, "-m", "smalltalk.cli", "launch", "--run", str(run), "--stage", "partition",
                    "--parallel", "3", "--set", "routing.partition_chunk=50"], check=True, cwd=ROOT, timeout=600)
    one = json.loads((tmp_path / "one" / "manifest.json").read_text())
    for name in one["files"]:
        assert (run / "partition" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    assert cli("launch", "--run", run, "--stage", "partition", "--scheduler", "slurm", "--parallel", "3") == 0
    array = (run / "jobs" / "partition.sbatch").read_text()
    merge = (run / "jobs" / "partition-merge.sbatch").read_text()
    for script in ("partition.sbatch", "partition-merge.sbatch"):
        subprocess.run(["bash", "-n", str(run / "jobs" / script)], check=True)
    assert "#SBATCH --array=0-2" in array and "--part ${SLURM_ARRAY_TASK_ID}/3" in array
    assert "--merge" in merge and "--array" not in merge
