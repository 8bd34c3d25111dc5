"""Whole-run verbs: `run` (every stage), `plan`, `launch` (a stage as jobs, local or SLURM), `status`."""

from __future__ import annotations

import argparse

from smalltalk.commands.common import add_common, load
from smalltalk.layout import RunLayout
from smalltalk.run.launch import LAUNCHABLE


def cmd_run(args: argparse.Namespace) -> None:
    from smalltalk.run.pipeline import run_pipeline

    cfg, run = load(args)
    run_pipeline(cfg, run)
    print(f"\nrun complete: {run.root}\nreport: {run.report_html}")


def cmd_plan(args: argparse.Namespace) -> None:
    from smalltalk.run.plan import GPU_PEAKS, ROUTER_MFU, format_plan, plan, resources

    cfg, _ = load(args)
    peak = (GPU_PEAKS.get(args.gpu.lower()) if args.gpu else None) or args.peak_flops
    rows = resources(cfg, peak, args.mfu, router_mfu=args.router_mfu or ROUTER_MFU)
    print(format_plan({**plan(cfg), "resources": rows}, peak, args.mfu))


def cmd_launch(args: argparse.Namespace) -> None:
    from smalltalk.errors import SmalltalkError
    from smalltalk.run.launch import (
        IN_PARTS,
        launch_experts_local,
        parts_local,
        run_stage_local,
        slurm_script,
        submit,
        write_launch_config,
    )

    cfg, run = load(args)
    write_launch_config(cfg, run)  # what every job reads
    parts = args.parallel or 2  # data, partition: parts (array tasks / local processes)
    if args.scheduler == "slurm":
        script = run.sbatch(args.stage)
        script.write_text(slurm_script(run, args.stage, args.gpus_per_expert, args.partition, args.hours, parts=parts))
        print(f"wrote {script}")
        merge = None
        if args.stage in IN_PARTS:  # the merge runs once every part has succeeded
            merge = run.sbatch(f"{args.stage}-merge")
            merge.write_text(slurm_script(run, args.stage, 1, args.partition, args.hours, merge=True))
            print(f"wrote {merge}")
        if args.submit:
            job = submit(script)
            print(job)
            if merge:
                print(submit(merge, after=job.split(";")[0]))
    elif args.stage == "experts":
        from smalltalk.experts.start import expert_steps

        records = launch_experts_local(run, expert_steps(cfg), args.parallel or cfg.experts.parallel)
        failed = [k for k, r in enumerate(records) if r["state"] != "done"]
        if failed:
            raise SmalltalkError(f"experts {failed} failed", where=str(run.jobs),
                                 fix="see `smalltalk status RUN` and jobs/experts-NN.log; relaunch to retry")
    elif args.stage in IN_PARTS:
        parts_local(run, args.stage, parts)
    else:
        run_stage_local(run, args.stage)


def cmd_status(args: argparse.Namespace) -> None:
    import json
    import time
    from pathlib import Path

    from smalltalk.run.status import format_status, run_status

    while True:
        status = run_status(RunLayout(Path(args.run_dir)))
        print(json.dumps(status, indent=2) if args.json else format_status(status), flush=True)
        if not args.watch:
            return
        time.sleep(args.watch)


def register(sub) -> None:
    p = sub.add_parser("run", help="every stage of a config in order (resumable)")
    add_common(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("plan", help="job list, token budgets, FLOPs and GPU-hours of a config")
    add_common(p)
    p.add_argument("--mfu", type=float, default=0.4, help="experts' and dense models' fraction of the peak")
    p.add_argument("--router-mfu", type=float, help="routers' fraction of the peak (default: plan.ROUTER_MFU, "
                   "measured on an H200)")
    p.add_argument("--gpu", choices=["h100", "h200", "a100", "v100"], default="h100")
    p.add_argument("--peak-flops", type=float, default=989e12, help="used when --gpu is not given")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("launch", help="run a stage as independent jobs, locally or as a SLURM array")
    add_common(p)
    p.add_argument("--stage", required=True, choices=LAUNCHABLE)
    p.add_argument("--scheduler", choices=["local", "slurm"], default="local")
    p.add_argument("--parallel", type=int, help="experts: local jobs at once; data, partition: parts (local "
                   "processes or array tasks, default 2)")
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
