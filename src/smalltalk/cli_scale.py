"""CLI commands of scaling out: plan, launch (local or SLURM), status."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from smalltalk.cli_pipeline import _load
from smalltalk.errors import SmalltalkError
from smalltalk.layout import RunLayout


def cmd_plan(args: argparse.Namespace) -> None:
    from smalltalk.plan import GPU_PEAKS, format_plan, plan

    cfg, _ = _load(args)
    peak = GPU_PEAKS.get(args.gpu.lower()) if args.gpu else None
    print(format_plan(plan(cfg), peak or args.peak_flops, args.mfu))


def add_plan_command(sub, common) -> None:
    p = sub.add_parser("plan", help="job list, token budgets, FLOPs and GPU-hours of a config")
    common(p)
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--gpu", choices=["h100", "h200", "a100", "v100"], default="h100")
    p.add_argument("--peak-flops", type=float, default=989e12, help="used when --gpu is not given")
    p.set_defaults(func=cmd_plan)


STAGE_ARGS = {"routers": ["routers", "train"], "partition": ["partition"], "dense": ["dense", "train"],
              "eval": ["eval"]}


def cmd_launch(args: argparse.Namespace) -> None:
    import shlex
    import subprocess

    from smalltalk.experts import num_experts
    from smalltalk.launch import launch_experts_local, slurm_script, submit

    cfg, run = _load(args)
    overrides = [*args.set, f"run_dir={run.root}"]
    if args.scheduler == "slurm":
        run.root.mkdir(parents=True, exist_ok=True)
        (run.root / "jobs").mkdir(exist_ok=True)
        if args.stage == "experts":
            text = slurm_script(run, num_experts(run), args.config, overrides, args.gpus_per_expert,
                                args.partition, args.hours)
        else:
            command = ["smalltalk", *STAGE_ARGS[args.stage], "--run-dir", str(run.root),
                       *(["--config", args.config] if args.config else []),
                       *[x for o in overrides for x in ("--set", o)]]
            text = "\n".join(["#!/usr/bin/env bash", f"#SBATCH --job-name=smalltalk-{args.stage}",
                              f"#SBATCH --gpus-per-node={args.gpus_per_expert}",
                              f"#SBATCH --time={args.hours}:00:00",
                              f"#SBATCH --output={run.root}/jobs/{args.stage}.log", "set -euo pipefail",
                              shlex.join(command), ""])
        script = run.root / "jobs" / f"{args.stage}.sbatch"
        script.write_text(text)
        print(f"wrote {script}")
        if args.submit:
            print(submit(script))
        return
    if args.stage == "experts":
        parallel = args.parallel or cfg.experts.parallel
        records = launch_experts_local(run, num_experts(run), cfg.train.steps, parallel, args.config, overrides)
        failed = [k for k, r in enumerate(records) if r["state"] != "done"]
        if failed:
            raise SmalltalkError(f"experts {failed} failed", where=str(run.root / "jobs"),
                                 fix="see `smalltalk status RUN` and jobs/experts-NN.log; relaunch to retry")
        return
    command = [sys.executable, "-m", "smalltalk.cli", *STAGE_ARGS[args.stage], "--run-dir", str(run.root),
               *(["--config", args.config] if args.config else []), *[x for o in overrides for x in ("--set", o)]]
    if subprocess.run(command).returncode != 0:
        raise SmalltalkError(f"stage {args.stage} failed", fix="read its output above")


def cmd_status(args: argparse.Namespace) -> None:
    import json
    import time

    from smalltalk.status import format_status, run_status

    while True:
        status = run_status(RunLayout(Path(args.run_dir)))
        print(json.dumps(status, indent=2) if args.json else format_status(status), flush=True)
        if not args.watch:
            return
        time.sleep(args.watch)


def add_launch_commands(sub, common) -> None:
    p = sub.add_parser("launch", help="run a stage as independent jobs, locally or as a SLURM array")
    common(p)
    p.add_argument("--stage", required=True, choices=["routers", "partition", "experts", "dense", "eval"])
    p.add_argument("--scheduler", choices=["local", "slurm"], default="local")
    p.add_argument("--parallel", type=int, help="local: jobs at once")
    p.add_argument("--submit", action="store_true", help="slurm: also run sbatch")
    p.add_argument("--gpus-per-expert", type=int, default=1)
    p.add_argument("--partition", help="slurm partition")
    p.add_argument("--hours", type=int, default=48)
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("status", help="state of every stage and expert of a run")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true")
    p.add_argument("--watch", type=float, help="refresh every this many seconds")
    p.set_defaults(func=cmd_status)
