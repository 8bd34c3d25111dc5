"""Independent jobs on this machine or on SLURM, and the status of a run.

`smalltalk launch --stage experts --scheduler local` runs one `smalltalk experts train --expert K` process
per expert, P at a time, and records each job in RUN/jobs/experts-NN.json (state, pid, command, exit code,
error). Relaunched after its own death, it re-attaches to jobs still running, skips finished ones and
restarts the others, which resume from their checkpoints. `--scheduler slurm` writes an sbatch array
script (one task per expert) that runs exactly the same command.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from smalltalk.errors import SmalltalkError
from smalltalk.fsutil import read_json, write_json
from smalltalk.layout import RunLayout


def expert_args(run: RunLayout, index: int | str, config_path: str | None, overrides: list[str]) -> list[str]:
    """The `smalltalk` arguments of expert job `index`: identical for local processes and SLURM tasks."""
    args = ["experts", "train", "--run-dir", str(run.root), "--expert", str(index)]
    if config_path:
        args += ["--config", str(config_path)]
    for item in overrides:
        args += ["--set", item]
    return args


def _job_path(run: RunLayout, index: int) -> Path:
    return run.root / "jobs" / f"experts-{index:02d}.json"


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


def _finished(run: RunLayout, index: int, steps: int) -> bool:
    manifest = run.expert(index) / "train_manifest.json"
    return manifest.is_file() and read_json(manifest)["steps"] >= steps


def launch_experts_local(run: RunLayout, experts: int, steps: int, parallel: int, config_path: str | None,
                         overrides: list[str]) -> list[dict]:
    """Run (or re-attach to) every expert job; returns the final job records."""
    threads = max(1, (os.cpu_count() or 1) // max(1, parallel))
    overrides = [*overrides, f"train.num_threads={threads}", "train.progress=false"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    (run.root / "jobs").mkdir(parents=True, exist_ok=True)
    pending, running = [], {}
    for k in range(experts):
        path = _job_path(run, k)
        record = read_json(path) if path.is_file() else {}
        marker = f"--expert {k} "
        if record.get("state") == "running" and _alive(record.get("pid", -1), marker):
            running[k] = (None, record)  # re-attach: someone else's child, watched through /proc
        elif _finished(run, k, steps):
            write_json(path, {**record, "state": "done"})
        else:
            pending.append(k)
    while pending or running:
        while pending and len(running) < max(1, parallel):
            k = pending.pop(0)
            cmd = [sys.executable, "-m", "smalltalk.cli", *expert_args(run, k, config_path, overrides)]
            run.expert(k).parent.mkdir(parents=True, exist_ok=True)
            with open(run.root / "jobs" / f"experts-{k:02d}.log", "a") as log:
                proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            record = {"state": "running", "pid": proc.pid, "command": shlex.join(cmd), "started": time.time()}
            write_json(_job_path(run, k), record)
            running[k] = (proc, record)
        for k, (proc, record) in list(running.items()):
            code = proc.poll() if proc is not None else (None if _alive(record["pid"], f"--expert {k} ") else -1)
            if code is None:
                continue
            ok = code == 0 if proc is not None else _finished(run, k, steps)
            record.update(state="done" if ok else "failed", ended=time.time(), returncode=code,
                          error=None if ok else _last_error(run.root / "jobs" / f"experts-{k:02d}.log"))
            write_json(_job_path(run, k), record)
            del running[k]
            print(f"expert {k:02d}: {record['state']}" + (f" ({record['error']})" if not ok else ""), flush=True)
        time.sleep(0.2)
    return [read_json(_job_path(run, k)) for k in range(experts)]


def slurm_script(run: RunLayout, experts: int, config_path: str | None, overrides: list[str],
                 gpus_per_expert: int = 1, partition: str | None = None, hours: int = 48,
                 cpus_per_gpu: int = 8) -> str:
    """An sbatch array script: task i runs expert i (torchrun over the task's GPUs)."""
    args = shlex.join(expert_args(run, "__TASK__", config_path, overrides)).replace("__TASK__",
                                                                                    "${SLURM_ARRAY_TASK_ID}")
    lines = ["#!/usr/bin/env bash", f"#SBATCH --job-name=smalltalk-experts-{run.root.name}",
             f"#SBATCH --array=0-{experts - 1}", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
             f"#SBATCH --gpus-per-node={gpus_per_expert}", f"#SBATCH --cpus-per-task={cpus_per_gpu * gpus_per_expert}",
             f"#SBATCH --time={hours}:00:00", f"#SBATCH --output={run.root}/jobs/experts-%a.log"]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    lines += ["set -euo pipefail", f"cd {shlex.quote(str(Path.cwd()))}",
              "# every expert is an independent job: no communication with the other array tasks",
              f"torchrun --standalone --nproc_per_node {gpus_per_expert} -m smalltalk.cli {args}", ""]
    return "\n".join(lines)


def submit(script: Path) -> str:
    try:
        out = subprocess.run(["sbatch", str(script)], capture_output=True, text=True, check=True)
    except FileNotFoundError:
        raise SmalltalkError("sbatch not found", fix=f"submit {script} from a SLURM login node") from None
    except subprocess.CalledProcessError as exc:
        raise SmalltalkError(f"sbatch failed: {exc.stderr.strip()}", where=str(script)) from None
    return out.stdout.strip()
