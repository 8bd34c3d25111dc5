"""Expert and dense-baseline jobs.

An expert trains on its partition share only, as a self-contained job (own process, checkpoints, logs):
nothing is shared with the other experts at run time. It starts where experts.init says (experts/start.py):
random weights (the paper), the run's trunk, or a pretrained checkpoint. The dense baselines train on the
whole train split with one schedule, each for a FLOPs budget, from where a user would start: random weights,
or the pretrained checkpoint when the experts continue one (its FLOPs are nobody's in this run):
- `matched` (the headline): one expert's architecture for the mixture's whole training budget: the trunk's
  FLOPs, the experts' and every routing FLOP (EM router training, EM scoring, partition scoring, refinement).
- `matched-trunk` (experts.init=trunk, `dense.from_trunk`): the same architecture continued from the experts'
  trunk for the budget after it, with a restarted schedule: a second column, never the headline (it trails
  dense from scratch at equal FLOPs).
- `matched-experts`: the trunk's and the experts' FLOPs, routing left out (the paper's match).
- `inference`: per sequence the mixture's inference FLOPs (routers on the prefix + one expert), the whole
  training budget: the dense model a user with the mixture's serving cost would train.
- `bigger`: per sequence the top-k mixture's inference FLOPs (routers + k experts, k = dense.bigger_k or E;
  c-BTM's protocol), the whole training budget, from scratch (never from a pretrained start: other shape).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from pathlib import Path

from smalltalk.config import Config, ModelConfig
from smalltalk.data.shards import SplitData
from smalltalk.errors import SmalltalkError
from smalltalk.experts.budget import experts_training_flops, mixture_training_flops, start_flops
from smalltalk.experts.start import expert_spec, start_model
from smalltalk.flops import forward_flops, training_flops
from smalltalk.fsutil import atomic_dir
from smalltalk.layout import DENSE_KINDS, RunLayout
from smalltalk.llama import ModelSpec, count_params, resolve_spec
from smalltalk.training.trainer import TrainJob, train


def dense_kinds(cfg: Config) -> list[str]:
    """The dense baselines a config asks for."""
    pretrained = cfg.experts.init == "pretrained"
    wanted = {"matched": True, "matched-trunk": cfg.dense.from_trunk and cfg.experts.init == "trunk",
              "matched-experts": cfg.dense.experts_only, "inference": cfg.dense.inference and not pretrained,
              "bigger": cfg.dense.bigger and not pretrained}
    return [kind for kind in DENSE_KINDS if wanted[kind]]


def bigger_spec(spec: ModelSpec, experts: int, preset: str | None) -> ModelSpec:
    """~E x the non-embedding size: same depth, width x sqrt(E), rounded to whole heads of even size."""
    if preset:
        return resolve_spec(ModelConfig(preset=preset), spec.vocab_size)
    head_dim = spec.head_dim
    heads = max(1, round(spec.num_heads * math.sqrt(experts)))
    hidden = heads * head_dim
    ffn = int(round(spec.intermediate_size * hidden / spec.hidden_size / 2)) * 2
    return dataclasses.replace(spec, hidden_size=hidden, num_heads=heads, intermediate_size=ffn,
                               num_kv_heads=None if spec.num_kv_heads is None else heads)


def spec_for_forward_flops(spec: ModelSpec, target: float, seq_len: int) -> ModelSpec:
    """One expert's depth and head size, widened (whole heads) with the MLP width that makes a forward pass
    over seq_len tokens cost `target` FLOPs: of the widths that reach it with a positive MLP, the one whose
    MLP-to-hidden ratio is closest to the expert's. Matches `target` up to rounding the MLP to even units."""
    ratio = spec.intermediate_size / spec.hidden_size
    best = None
    for heads in range(1, 64 * spec.num_heads + 1):
        wide = dataclasses.replace(spec, hidden_size=heads * spec.head_dim, num_heads=heads, intermediate_size=0,
                                   num_kv_heads=None if spec.num_kv_heads is None else heads)
        per_unit = 6 * seq_len * wide.hidden_size * wide.num_layers  # FLOPs of one MLP unit (three matmuls)
        ffn = int(round((target - forward_flops(wide, seq_len)) / per_unit / 2)) * 2
        if ffn < 2:
            break  # wider still only costs more
        miss = abs(math.log(ffn / wide.hidden_size / ratio))
        if best is None or miss < best[0]:
            best = (miss, dataclasses.replace(wide, intermediate_size=ffn))
    if best is None:
        raise SmalltalkError(f"no model of {spec.num_layers} layers costs {target:.3e} FLOPs per sequence of "
                             f"{seq_len}", fix="turn the inference-matched dense baselines off (dense.inference, "
                                               "dense.bigger) or set dense.bigger_preset")
    return best[1]


def dense_plan(cfg: Config, run: RunLayout, kind: str, seq_len: int) -> tuple[ModelSpec, float, Path | None]:
    """(architecture, training FLOPs budget, starting weights) of dense baseline `kind`."""
    from smalltalk.experts.budget import inference_flops

    experts, vocab = run.num_experts(), SplitData(run.data, "train").vocab_size
    spec, whole, trunk = expert_spec(cfg, vocab), mixture_training_flops(run), start_flops(run)
    user_start = start_model(cfg, run) if cfg.experts.init == "pretrained" else None
    if kind == "matched":
        return spec, whole, user_start
    if kind == "matched-trunk":
        if cfg.experts.init != "trunk":
            raise SmalltalkError("dense matched-trunk continues the experts' trunk; this run has none",
                                 fix="set experts.init=trunk, or train another dense kind")
        return spec, whole - trunk, start_model(cfg, run)
    if kind == "matched-experts":
        return spec, trunk + experts_training_flops(run), user_start
    if kind in ("inference", "bigger"):
        if kind == "bigger" and cfg.dense.bigger_preset:
            return bigger_spec(spec, experts, cfg.dense.bigger_preset), whole, None
        k = 1 if kind == "inference" else min(cfg.dense.bigger_k or experts, experts)
        cost = inference_flops(run, spec, run.prefix(), seq_len, "exact")
        return spec_for_forward_flops(spec, cost["routing"] + k * cost["expert"], seq_len), whole, None
    raise SmalltalkError(f"unknown dense kind {kind!r} (use {', '.join(DENSE_KINDS)})")


def train_dense(cfg: Config, run: RunLayout, kind: str = "matched", resume: bool = True) -> dict:
    """Dense baseline `kind` on the whole train split, sized against the trained mixture (dense_plan). A kind
    whose job equals one already trained (routing that costs no model FLOPs makes `inference` the `matched`
    job) is that job's directory, hard-linked: the same seeded job would train the same weights again."""
    data, val = SplitData(run.data, "train"), SplitData(run.data, "validation")
    job = _dense_job(cfg, run, kind, data, val)
    for other in DENSE_KINDS[:DENSE_KINDS.index(kind)]:
        if run.dense_summary(other) is not None and not run.dense_kind(kind).exists() and \
                _dense_job(cfg, run, other, data, val) == dataclasses.replace(job, out_dir=run.dense_kind(other),
                                                                              name=f"dense {other}"):
            with atomic_dir(run.dense_kind(kind)) as tmp:
                shutil.copytree(run.dense_kind(other), tmp, dirs_exist_ok=True, copy_function=os.link)
            break
    summary = run.dense_summary(kind) or train(job, resume=resume)  # a finished job is not resumed (rewritten)
    summary["non_embedding_ratio_to_expert"] = count_params(job.spec, False) / count_params(
        expert_spec(cfg, data.vocab_size), False)
    return summary


def kinds_to_train(cfg: Config, run: RunLayout) -> list[str]:
    """The dense kinds of the config not trained yet, one per distinct job: a kind whose job equals an earlier
    kind's is linked to that one by `train_dense`, never trained itself."""
    data, val = SplitData(run.data, "train"), SplitData(run.data, "validation")
    seen: list[TrainJob] = []
    pending = []
    for kind in dense_kinds(cfg):
        job = dataclasses.replace(_dense_job(cfg, run, kind, data, val), out_dir=run.dense, name="dense")
        if any(job == other for other in seen):
            continue
        seen.append(job)
        if run.dense_summary(kind) is None:
            pending.append(kind)
    return pending


def _dense_job(cfg: Config, run: RunLayout, kind: str, data: SplitData, val: SplitData) -> TrainJob:
    seq = cfg.train.seq_len or data.seq_len
    spec, budget, init_from = dense_plan(cfg, run, kind, seq)
    train_cfg = matched_config(cfg.train, budget, training_flops(spec, seq, 1, 1), run.num_experts(),
                               cfg.dense.match if spec == expert_spec(cfg, data.vocab_size) else "steps")
    return TrainJob(spec, train_cfg, data, run.dense_kind(kind), val=val if len(val) else None,
                    name=f"dense {kind}", init_from=init_from)


def matched_config(tc, budget: float, flops_per_sequence: float, experts: int, match: str):
    """The trainer settings that spend `budget` training FLOPs with one expert's architecture: more steps at
    the expert's batch (`match: steps`), or a larger batch for the expert's steps (`match: batch`, the
    paper's way); warmup scaled by E as the steps are. Rounded to a whole step (or sequence per batch)."""
    batch = tc.micro_batch_size * tc.grad_accum
    if match == "steps":
        steps = max(1, round(budget / (flops_per_sequence * batch)))
        return dataclasses.replace(tc, steps=steps, warmup_steps=min(tc.warmup_steps * experts, steps))
    if match == "batch":
        micro = max(1, round(budget / (flops_per_sequence * tc.steps * tc.grad_accum)))
        return dataclasses.replace(tc, micro_batch_size=micro)
    raise SmalltalkError(f"dense.match must be 'steps' or 'batch', got {match!r}")
