"""`smalltalk run`: every stage of a config in order, skipping the ones already done.

A stage is done when its manifest exists and RUN/stages.json records the same config digest for it.
A finished stage whose config changed is an error (use a new run directory): silently mixing
artifacts of two configs would make the comparison meaningless.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable

from smalltalk.config import Config, config_to_dict
from smalltalk.errors import SmalltalkError
from smalltalk.fsutil import read_json, write_json
from smalltalk.layout import RunLayout

STAGES = ("tokenizer", "data", "routers", "partition", "experts", "dense", "eval", "report")


def _stage_config(cfg: Config, stage: str) -> dict:
    """The config sections a stage's output depends on (cumulative: later stages include earlier ones)."""
    sections = {"tokenizer": ["data", "tokenizer"], "data": ["data", "tokenizer"],
                "routers": ["data", "tokenizer", "routing"], "partition": ["data", "tokenizer", "routing"],
                "experts": ["data", "tokenizer", "routing", "model", "train"],
                "dense": ["data", "tokenizer", "routing", "model", "train", "dense"],
                "eval": ["data", "tokenizer", "routing", "model", "train", "dense", "eval"],
                "report": ["data", "tokenizer", "routing", "model", "train", "dense", "eval"]}[stage]
    full = config_to_dict(cfg)
    picked = {k: full[k] for k in sections}
    for volatile in ("num_threads", "progress", "device", "tensorboard"):  # do not change results
        for section in ("train",):
            picked.get(section, {}).pop(volatile, None)
        picked.get("routing", {}).get("train", {}).pop(volatile, None)
    picked.get("routing", {}).pop("parallel", None)
    return picked


def digest(cfg: Config, stage: str) -> str:
    return hashlib.sha256(json.dumps(_stage_config(cfg, stage), sort_keys=True).encode()).hexdigest()[:16]


def run_pipeline(cfg: Config, stages: dict[str, Callable[[], None]], run: RunLayout,
                 done: dict[str, Callable[[], bool]]) -> None:
    run.root.mkdir(parents=True, exist_ok=True)
    write_json(run.root / "config.json", config_to_dict(cfg))
    record_path = run.root / "stages.json"
    record = read_json(record_path) if record_path.exists() else {}
    for stage in STAGES:
        want = digest(cfg, stage)
        if stage in record and done[stage]():
            if record[stage]["digest"] != want:
                raise SmalltalkError(f"stage '{stage}' of {run.root} was produced with a different config",
                                     fix="use a new run directory (--run) for the new config")
            print(f"[{stage}] done, skipped", flush=True)
            continue
        print(f"[{stage}] running", flush=True)
        start = time.perf_counter()
        stages[stage]()
        record[stage] = {"digest": want, "seconds": round(time.perf_counter() - start, 1)}
        write_json(record_path, record)
