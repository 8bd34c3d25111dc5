"""Independent jobs on this machine or on SLURM, and the status of a run.

`smalltalk launch --stage experts --scheduler local` runs one `smalltalk experts train --expert K` process
per expert, P at a time, and records each job in RUN/jobs/experts-NN.json (state, pid, command, exit code,
error). Relaunched after its own death, it re-attaches to jobs still running, skips finished ones and
restarts the others, which resume from their checkpoints. `--scheduler slurm` writes an sbatch array
script (one task per expert) that runs exactly the same command.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from smalltalk.config import Config, save_config
from smalltalk.errors import SmalltalkError
from smalltalk.fsutil import read_json, write_json
from smalltalk.host import die_with_parent, threads_per_job
from smalltalk.layout import RunLayout, manifest_of

# The `smalltalk` verbs that run a stage of a run as one job; each reads RUN/config.json.
STAGE_VERBS = {"data": ["data", "prepare"], "trunk": ["trunk", "train"], "routers": ["routers", "train"],
               "partition": ["partition"], "experts": ["experts", "train"],
               "refine": ["routers", "refine"], "dense": ["dense", "train"], "eval": ["eval"]}
IN_PARTS = ("data", "partition")  # stages run as P part jobs + a merge
LAUNCHABLE = tuple(STAGE_VERBS)


def stage_args(run: RunLayout, stage: str, task: int | str | None = None, tasks: int | None = None) -> list[str]:
    """The `smalltalk` arguments of one job of `stage` (task K: expert K, or partition part K of `tasks`):
    identical for local processes and SLURM tasks. No config travels on the command line: the job reads
    RUN/config.json."""
    args = [*STAGE_VERBS[stage], "--run-dir", str(run.root)]
    if task is None:
        return args
    return args + (["--part", f"{task}/{tasks}"] if stage in IN_PARTS else ["--expert", str(task)])


def array_size(run: RunLayout, stage: str, parts: int) -> int | None:
    """Tasks of a stage that runs as an array: one per expert, or `parts` partition parts; None: one job."""
    if stage == "experts":
        return run.num_experts()
    return parts if stage in IN_PARTS else None


def write_launch_config(cfg: Config, run: RunLayout) -> None:
    """RUN/config.json, which every launched job reads (run_dir set to where the run is)."""
    run.jobs.mkdir(parents=True, exist_ok=True)
    save_config(dataclasses.replace(cfg, run_dir=str(run.root)), run.config_file)


def _alive(pid: int, marker: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return marker in cmdline


def _last_error(log: Path) -> str | None:
    if not log.is_file():
        return None
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error:") or "Error" in x]
    return (errors or lines or [None])[-1]


def _job_threads(jobs: int) -> tuple[dict, list[str]]:
    """The environment and `--set`s of one of `jobs` local child jobs run at once: an equal share of this
    process's cores (smalltalk.host), no progress bars in its log."""
    threads = threads_per_job(jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return env, ["--set", f"train.num_threads={threads}", "--set", "train.progress=false"]


def launch_experts_local(run: RunLayout, steps: int, parallel: int) -> list[dict]:
    """Run (or re-attach to) every expert job of the run's partition; returns the final job records."""
    experts = run.num_experts()
    env, local = _job_threads(parallel)  # this process's cores
    run.jobs.mkdir(parents=True, exist_ok=True)
    pending, running = [], {}
    for k in range(experts):
        path = run.job_record(k)
        record = read_json(path) if path.is_file() else {}
        marker = f"--expert {k} "
        if record.get("state") == "running" and _alive(record.get("pid", -1), marker):
            running[k] = (None, record)  # re-attach: someone else's child, watched through /proc
            print(f"expert {k:02d}: re-attached to its running job (pid {record['pid']})", flush=True)
        elif run.expert_done(k, steps):
            write_json(path, {**record, "state": "done"})
        else:
            pending.append(k)
    while pending or running:
        while pending and len(running) < max(1, parallel):
            k = pending.pop(0)
            cmd = [sys.executable, "-m", "smalltalk.cli", *stage_args(run, "experts", k), *local]
            run.experts_dir.mkdir(parents=True, exist_ok=True)
            with open(run.job_log(k), "a") as log:
                proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            record = {"state": "running", "pid": proc.pid, "command": shlex.join(cmd), "started": time.time()}
            write_json(run.job_record(k), record)
            running[k] = (proc, record)
        for k, (proc, record) in list(running.items()):
            code = proc.poll() if proc is not None else (None if _alive(record["pid"], f"--expert {k} ") else -1)
            if code is None:
                continue
            ok = code == 0 if proc is not None else run.expert_done(k, steps)
            record.update(state="done" if ok else "failed", ended=time.time(), returncode=code,
                          error=None if ok else _last_error(run.job_log(k)))
            write_json(run.job_record(k), record)
            del running[k]
            print(f"expert {k:02d}: {record['state']}" + (f" ({record['error']})" if not ok else ""), flush=True)
        time.sleep(0.2)
    return [read_json(run.job_record(k)) for k in range(experts)]


def run_stage_local(run: RunLayout, stage: str) -> None:
    """One non-expert stage as a child process on this machine (the same command a SLURM job runs)."""
    command = [sys.executable, "-m", "smalltalk.cli", *stage_args(run, stage)]
    if subprocess.run(command).returncode != 0:
        raise SmalltalkError(f"stage {stage} failed", fix="read its output above")


def dense_side_by_side(run: RunLayout, kinds: list[str], parallel: int) -> None:
    """Dense baselines `kinds` as `smalltalk dense train --kind K` processes, `parallel` at a time (this
    process's cores split evenly): they are independent jobs of the whole budget each, and a small model gains
    little from a second thread (docs/benchmarks.md). Each writes RUN/jobs/dense-KIND.log, dies with this
    process, and resumes from its checkpoints when rerun."""
    env, local = _job_threads(min(parallel, len(kinds)))
    run.jobs.mkdir(parents=True, exist_ok=True)
    failed = []
    for start in range(0, len(kinds), max(1, parallel)):
        procs = {}
        for kind in kinds[start:start + max(1, parallel)]:
            with open(run.dense_job_log(kind), "a") as log:
                procs[kind] = subprocess.Popen([sys.executable, "-m", "smalltalk.cli", *stage_args(run, "dense"),
                                                "--kind", kind, *local], env=env, stdout=log,
                                               stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        for kind, proc in procs.items():
            code = proc.wait()
            print(f"dense {kind}: {'done' if code == 0 else 'failed'}", flush=True)
            if code != 0:
                failed.append(f"{kind} ({_last_error(run.dense_job_log(kind))})")
    if failed:
        raise SmalltalkError(f"dense baselines failed: {'; '.join(failed)}", where=str(run.jobs),
                             fix="read RUN/jobs/dense-KIND.log, fix, and rerun (finished ones are kept)")


def parts_local(run: RunLayout, stage: str, parts: int) -> None:
    """A stage of IN_PARTS as `parts` processes at once (part K of P each, threads split evenly), then the
    merge. A rerun skips finished parts: each is written atomically."""
    env, _ = _job_threads(parts)
    procs = [subprocess.Popen([sys.executable, "-m", "smalltalk.cli", *stage_args(run, stage, k, parts)],
                              env=env) for k in range(parts)]
    failed = [k for k, proc in enumerate(procs) if proc.wait() != 0]
    if failed:
        raise SmalltalkError(f"{stage} parts {failed} of {parts} failed", fix="read their output above; "
                             "relaunch to redo only the missing parts")
    merge = [sys.executable, "-m", "smalltalk.cli", *STAGE_VERBS[stage], "--run-dir", str(run.root), "--merge"]
    if subprocess.run(merge).returncode != 0:
        raise SmalltalkError(f"{stage} merge failed", fix="read its output above")


def slurm_script(run: RunLayout, stage: str, gpus: int = 1, partition: str | None = None, hours: int = 48,
                 cpus_per_gpu: int = 8, parts: int = 1, merge: bool = False) -> str:
    """An sbatch script for `stage`. Experts: an array, task i runs expert i (torchrun over the task's
    GPUs) as an independent job; partition: an array of `parts` parts (`merge`: the merge job that
    follows it); other stages: one job."""
    tasks = None if merge else array_size(run, stage, parts)
    args = [*STAGE_VERBS[stage], "--run-dir", str(run.root), "--merge"] if merge else \
        stage_args(run, stage, "__TASK__" if tasks else None, tasks)
    command = shlex.join(args).replace("__TASK__", "${SLURM_ARRAY_TASK_ID}")
    experts = stage == "experts"
    name = f"smalltalk-{stage}{'-merge' if merge else ''}-{run.root.name}"
    log = str(run.sbatch_log(stage + ('-merge' if merge else ''), bool(tasks)))
    lines = ["#!/usr/bin/env bash", f"#SBATCH --job-name={_directive_value(name)}"]
    if tasks:
        lines.append(f"#SBATCH --array=0-{tasks - 1}")
    lines += ["#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1", f"#SBATCH --gpus-per-node={gpus}",
              f"#SBATCH --cpus-per-task={cpus_per_gpu * gpus}", f"#SBATCH --time={hours}:00:00",
              f"#SBATCH --output={_directive_value(log)}"]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    lines += ["set -euo pipefail", f"cd {shlex.quote(str(Path.cwd()))}"]
    if tasks:
        lines.append(f"# every {'expert' if experts else 'part'} is an independent job: no communication with "
                     "the other array tasks")
    if (tasks or stage in ("partition", "trunk")) and stage != "data":  # data prepare is CPU work: no torchrun
        lines.append(f"torchrun --standalone --nproc_per_node {gpus} -m smalltalk.cli {command}")
    else:
        lines.append(f"smalltalk {command}")
    lines.append("")
    return "\n".join(lines)


def _directive_value(value: str) -> str:
    """A value for an #SBATCH line: double-quoted (SLURM's parser honours quotes, so spaces are safe); a
    quote or line break cannot be written there and is refused."""
    if any(c in value for c in '"\n\r'):
        raise SmalltalkError(f"{value!r} cannot go into an #SBATCH line (a quote or line break)",
                             fix="use a run directory whose path has no quotes or line breaks")
    return '"' + value + '"'


def submit(script: Path, after: str | None = None) -> str:
    """sbatch `script` (after job `after` succeeded, if given); returns sbatch's answer."""
    dependency = [f"--dependency=afterok:{after}"] if after else []
    try:
        out = subprocess.run(["sbatch", "--parsable", *dependency, str(script)], capture_output=True, text=True,
                             check=True)
    except FileNotFoundError:
        raise SmalltalkError("sbatch not found", fix=f"submit {script} from a SLURM login node") from None
    except subprocess.CalledProcessError as exc:
        raise SmalltalkError(f"sbatch failed: {exc.stderr.strip()}", where=str(script)) from None
    return out.stdout.strip()


def train_all_experts(cfg: Config, run: RunLayout, parallel: int) -> dict:
    """Every expert as its own `smalltalk experts train --expert K` process, `parallel` at a time (threads
    split evenly: two 1-thread jobs beat one 2-thread job by ~1/3 on 2 cores). The children read
    RUN/config.json, written here. A failed expert does not stop the others and a rerun re-attaches or
    resumes; once all are done, returns mixture.json."""
    from smalltalk.experts.expert import write_expert_data
    from smalltalk.experts.start import expert_steps
    from smalltalk.mixture.model import write_mixture_manifest

    save_config(cfg, run.config_file)
    if cfg.experts.materialize:
        missing = [k for k in range(run.num_experts()) if not manifest_of(run.expert_data(k)).is_file()]
        write_expert_data(cfg, run, missing)
    records = launch_experts_local(run, expert_steps(cfg), parallel)
    failed = [k for k, r in enumerate(records) if r["state"] != "done"]
    if failed:
        raise SmalltalkError(f"experts {failed} failed", where=str(run.jobs),
                             fix="read `smalltalk status RUN` and RUN/jobs/experts-NN.log, fix, and rerun "
                                 "(finished experts are kept)")
    return write_mixture_manifest(run)
