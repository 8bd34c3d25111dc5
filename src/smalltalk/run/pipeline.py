"""The pipeline: the one STAGES table (what each stage does, when it is done, what config it depends on)
and `smalltalk run`'s loop over it, skipping the stages already done.

A stage is done when its done-check holds and RUN/stages.json records the same config digest for it.
A finished stage whose config changed is an error (use a new run directory): silently mixing artifacts
of two configs would make the comparison meaningless. To add a stage: write its function (cfg, run) in
the library module that owns its artifact, and add a row here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from smalltalk.config import ADDED_LATER, DEFAULTS_CHANGED, SECTIONS_ADDED_LATER, Config, save_config
from smalltalk.errors import SmalltalkError
from smalltalk.fsutil import remove_stale_temps, write_json
from smalltalk.layout import RunLayout, TrainFiles, manifest_of


def _tokenizer(cfg: Config, run: RunLayout) -> None:
    from smalltalk.data.tokenizer import make_tokenizer

    make_tokenizer(cfg, run.tokenizer)


def _data(cfg: Config, run: RunLayout) -> None:
    from smalltalk.data.prepare import prepare_data

    prepare_data(cfg, run.tokenizer, run.data)


def _routers(cfg: Config, run: RunLayout) -> None:
    from smalltalk.routing.methods import train_routers

    train_routers(cfg, run.data, run.routers)


def _partition(cfg: Config, run: RunLayout) -> None:
    from smalltalk.routing.partition import partition_run

    partition_run(cfg, run)


def _trunk(cfg: Config, run: RunLayout) -> None:
    """Only with experts.init=trunk: otherwise a no-op that records the digest."""
    if cfg.experts.init == "trunk":
        from smalltalk.experts.start import train_trunk

        train_trunk(cfg, run)


def _trunk_done(cfg: Config, run: RunLayout) -> bool:
    from smalltalk.experts.start import trunk_steps

    return cfg.experts.init != "trunk" or TrainFiles(run.trunk).done(trunk_steps(cfg))


def _experts(cfg: Config, run: RunLayout) -> None:
    from smalltalk.run.launch import train_all_experts

    train_all_experts(cfg, run, cfg.experts.parallel)


def _refine(cfg: Config, run: RunLayout) -> None:
    """Off unless refine.sequences > 0: a no-op that records the digest."""
    if cfg.refine.sequences:
        from smalltalk.experts.refine import refine_routers

        refine_routers(cfg, run)


def _dense(cfg: Config, run: RunLayout) -> None:
    """The dense baselines: side by side as local jobs when `experts.parallel` > 1 (as the experts are), then
    each kind in this process (a trained one is read, a duplicate job linked)."""
    from smalltalk.experts.dense import dense_kinds, kinds_to_train, train_dense

    pending = kinds_to_train(cfg, run) if cfg.experts.parallel > 1 else []
    if len(pending) > 1:
        from smalltalk.run.launch import dense_side_by_side

        dense_side_by_side(run, pending, cfg.experts.parallel)  # the jobs read RUN/config.json, written first
    for kind in dense_kinds(cfg):
        train_dense(cfg, run, kind)


def _eval(cfg: Config, run: RunLayout) -> None:
    from smalltalk.evaluation.eval_stage import evaluate_run, format_results

    print(format_results(evaluate_run(cfg, run)))


def _report(cfg: Config, run: RunLayout) -> None:
    from smalltalk.evaluation.report import write_report

    print(write_report(run))


def _sft(cfg: Config, run: RunLayout) -> None:
    """Off unless sft.enabled (then sft.data names the instruction set): a no-op that records the digest."""
    if not cfg.sft.enabled:
        return
    from pathlib import Path

    from smalltalk.sft.job import run_sft
    from smalltalk.sft.measure import format_results, measure_sft

    if not cfg.sft.data:
        raise SmalltalkError("sft.enabled needs sft.data", fix="set sft.data to an instruction file or directory")
    run_sft(cfg, run, Path(cfg.sft.data))
    print(format_results(measure_sft(run, run.sft, Path(cfg.sft.data), cfg.sft.route_on)))


def _experts_done(cfg: Config, run: RunLayout) -> bool:
    from smalltalk.experts.start import expert_steps

    return run.has_mixture() and all(run.expert_done(k, expert_steps(cfg)) for k in range(run.num_experts()))


def _dense_done(cfg: Config, run: RunLayout) -> bool:
    from smalltalk.experts.dense import dense_kinds

    return all(run.dense_summary(kind) is not None for kind in dense_kinds(cfg))


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Config, RunLayout], None]
    done: Callable[[Config, RunLayout], bool]
    sections: tuple[str, ...]  # config sections its output depends on (cumulative: later include earlier)


_DATA = ("data", "tokenizer")
_ROUTING = (*_DATA, "routing")
_TRUNK = (*_DATA, "model", "train", "experts")
_EXPERTS = (*_ROUTING, "model", "train", "experts")
_REFINE = (*_EXPERTS, "refine")
_EVAL = (*_REFINE, "dense", "eval")

STAGES: tuple[Stage, ...] = (
    Stage("tokenizer", _tokenizer, lambda cfg, run: manifest_of(run.tokenizer).is_file(), _DATA),
    Stage("data", _data, lambda cfg, run: manifest_of(run.data).is_file(), _DATA),
    Stage("trunk", _trunk, _trunk_done, _TRUNK),  # experts.init=trunk only; needs the data, not the routers
    Stage("routers", _routers, lambda cfg, run: manifest_of(run.routers).is_file(), _ROUTING),
    Stage("partition", _partition, lambda cfg, run: manifest_of(run.partition).is_file(), _ROUTING),
    Stage("experts", _experts, _experts_done, _EXPERTS),
    Stage("refine", _refine, lambda cfg, run: not cfg.refine.sequences or manifest_of(run.routers_refined).is_file(),
          _REFINE),
    Stage("dense", _dense, _dense_done, (*_REFINE, "dense")),  # matched in full: refinement's FLOPs count
    Stage("eval", _eval, lambda cfg, run: run.results_file(run.eval).is_file(), _EVAL),
    Stage("report", _report, lambda cfg, run: run.report_md.is_file(), _EVAL),
    Stage("sft", _sft, lambda cfg, run: not cfg.sft.enabled or run.sft.results.is_file(), (*_EVAL, "sft")),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)

# Settings that change how fast a stage runs, never what it produces: left out of the digest.
_VOLATILE = {"train": ("num_threads", "progress", "device", "tensorboard", "forward"),
             "routing.train": ("num_threads", "progress", "device", "tensorboard", "forward"),
             "routing": ("parallel",), "experts": ("parallel", "materialize")}


def stage_config(cfg: Config, stage: Stage) -> dict:
    """The part of the config a stage's output depends on: what its digest hashes."""
    full = dataclasses.asdict(cfg)
    picked = {k: full[k] for k in stage.sections}
    for section in SECTIONS_ADDED_LATER:
        if section in picked and picked[section] == dataclasses.asdict(type(getattr(cfg, section))()):
            picked.pop(section)
    for section in picked:
        for key in ADDED_LATER.get(section, ()):
            if picked[section][key] == ADDED_LATER[section][key]:
                picked[section].pop(key)
    for dotted, keys in _VOLATILE.items():
        section = picked
        for part in dotted.split("."):
            section = section.get(part, {})
        for key in keys:
            section.pop(key, None)
    return {k: v for k, v in picked.items() if v != {}}  # a section left empty: as if it were not there


def digest(cfg: Config, stage: Stage) -> str:
    return hashlib.sha256(json.dumps(stage_config(cfg, stage), sort_keys=True).encode()).hexdigest()[:16]


def accepted_digests(cfg: Config, stage: Stage) -> set[str]:
    """The stage's digest, and the one it had before a default it leaves unchanged was changed
    (DEFAULTS_CHANGED): a run finished then still counts as done."""
    old = cfg
    for section, keys in DEFAULTS_CHANGED.items():
        current = getattr(cfg, section)
        fresh = type(current)()
        at_default = {k: v for k, v in keys.items() if getattr(current, k) == getattr(fresh, k)}
        old = dataclasses.replace(old, **{section: dataclasses.replace(current, **at_default)})
    return {digest(cfg, stage), digest(old, stage)}


def run_pipeline(cfg: Config, run: RunLayout) -> None:
    run.root.mkdir(parents=True, exist_ok=True)
    for path in remove_stale_temps(run.root):  # left by a killed earlier run: never a finished artifact
        print(f"removed {path} (left by a killed run)", flush=True)
    record = run.stages()
    for stage in STAGES:  # before RUN/config.json is written: a refused config leaves the run's own one in place
        if stage.name in record and record[stage.name]["digest"] not in accepted_digests(cfg, stage) \
                and stage.done(cfg, run):
            raise SmalltalkError(f"stage '{stage.name}' of {run.root} was produced with a different config",
                                 fix="use a new run directory (--run) for the new config")
    save_config(cfg, run.config_file)
    for stage in STAGES:
        want = digest(cfg, stage)
        if stage.name in record and stage.done(cfg, run):
            print(f"[{stage.name}] done, skipped", flush=True)
            continue
        print(f"[{stage.name}] running", flush=True)
        start = time.perf_counter()
        stage.run(cfg, run)
        record[stage.name] = {"digest": want, "seconds": round(time.perf_counter() - start, 1)}
        write_json(run.stages_file, record)
