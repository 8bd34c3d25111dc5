"""`smalltalk status RUN`: every stage and every expert at a glance (or as JSON for scripts)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from smalltalk.experts.start import steps_after_start
from smalltalk.fsutil import read_json, read_jsonl
from smalltalk.layout import RunLayout, TrainFiles, manifest_of
from smalltalk.run.pipeline import STAGE_NAMES
from smalltalk.training.checkpoint import latest_checkpoint


def _last_metrics(path: Path) -> dict:
    if not path.is_file():
        return {}
    rows = [r for r in read_jsonl(path) if "loss" in r]
    return rows[-1] if rows else {}


def expert_status(run: RunLayout, index: int, target_steps: int | None) -> dict:
    directory = run.expert(index)
    job_path = run.job_record(index)
    job = read_json(job_path) if job_path.is_file() else {}
    last = _last_metrics(TrainFiles(directory).metrics)
    checkpoint = latest_checkpoint(directory)
    done = run.expert_done(index, target_steps)
    state = job.get("state") or ("done" if done else ("running" if last else "pending"))
    if done and state != "failed":
        state = "done"
    step = last.get("step", 0)
    tok_s = last.get("tokens_per_s")
    tokens_per_step = last["tokens"] / step if step else None
    eta = ((target_steps - step) * tokens_per_step / tok_s) if (tok_s and target_steps and tokens_per_step
                                                                 and state == "running") else None
    return {"expert": index, "state": state, "step": step, "target_steps": target_steps,
            "tokens": last.get("tokens", 0),
            "target_tokens": int(tokens_per_step * target_steps) if tokens_per_step and target_steps else None,
            "loss": last.get("loss"), "tokens_per_s": tok_s, "eta_s": eta,
            "last_checkpoint": os.path.getmtime(checkpoint) if checkpoint else None,
            "error": job.get("error"), "pid": job.get("pid")}


def run_status(run: RunLayout) -> dict:
    stages = run.stages()
    config = run.config() or {}
    target, experts_cfg = config.get("train", {}).get("steps"), config.get("experts", {})
    init = experts_cfg.get("init", "scratch")
    if target:
        target = steps_after_start(target, init, experts_cfg.get("trunk_fraction", 0.0))
    out = {"run": str(run.root), "stages": {}}
    for name, directory in {"tokenizer": run.tokenizer, "data": run.data, "trunk": None, "routers": run.routers,
                            "partition": run.partition}.items():
        out["stages"][name] = _trunk_state(run, init) if directory is None else \
            "done" if manifest_of(directory).is_file() else "pending"
    for name in STAGE_NAMES[STAGE_NAMES.index("refine"):]:
        out["stages"][name] = "done" if name in stages else "pending"
    experts = run.num_experts() if manifest_of(run.partition).is_file() else 0
    out["experts"] = [expert_status(run, k, target) for k in range(experts)]
    mixture = run.mixture() if run.has_mixture() else {}
    out["mixture"] = mixture.get("expert_dirs", [])
    added = [(op["pair"], op["expert_steps"]) for op in mixture.get("elastic", []) if op["op"] == "add"]
    for pair, steps in added + [(p["index"], None) for p in run.pending_adds()]:  # elastic pairs
        out["experts"].append({**expert_status(run, pair, steps), "added": True})
    states = {e["state"] for e in out["experts"]}
    out["stages"]["experts"] = ("failed" if "failed" in states else "done" if states == {"done"}
                                else "running" if "running" in states else "pending") if experts else "pending"
    return out


def _trunk_state(run: RunLayout, init: str) -> str:
    """The trunk stage (experts.init=trunk only): done, running at step S, or pending. What is on disk wins
    over the config (a hand-run `trunk train` writes no RUN/config.json)."""
    if init != "trunk" and not run.trunk.exists():
        return "unused" if init == "scratch" else f"unused ({init} start)"
    files = TrainFiles(run.trunk)
    step = _last_metrics(files.metrics).get("step")
    return "done" if files.done() else f"running (step {step})" if step else "pending"


def format_status(status: dict) -> str:
    lines = [f"run {status['run']}", "stages: " + "  ".join(f"{k}={v}" for k, v in status["stages"].items()), "",
             "| expert | state | step | tokens | loss | tok/s | ETA | last checkpoint |",
             "|---|---|---|---|---|---|---|---|"]
    for e in status["experts"]:
        ckpt = time.strftime("%H:%M:%S", time.localtime(e["last_checkpoint"])) if e["last_checkpoint"] else "-"
        loss = "-" if e["loss"] is None else f"{e['loss']:.3f}"
        speed = "-" if not e["tokens_per_s"] else f"{e['tokens_per_s']:,.0f}"
        eta = "-" if e["eta_s"] is None else f"{e['eta_s']:.0f}s"
        name = f"{e['expert']:02d}" + (" (added)" if e.get("added") else "")
        lines.append(f"| {name} | {e['state']} | {e['step']}/{e['target_steps']} | "
                     f"{e['tokens'] / 1e6:.1f}M/{(e['target_tokens'] or 0) / 1e6:.1f}M | {loss} | {speed} | {eta} | "
                     f"{ckpt} |")
        if e["error"]:
            lines.append(f"|    | error: {e['error']} |||||||")
    if status.get("mixture"):
        lines.append(f"\nmixture.json: {len(status['mixture'])} experts: " + ", ".join(status["mixture"]))
    return "\n".join(lines)
