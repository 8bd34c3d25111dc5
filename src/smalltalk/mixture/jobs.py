"""Expert and dense-baseline jobs.

An expert trains on its partition share only, as a self-contained job (own process, checkpoints, logs):
nothing is shared with the other experts at run time. It starts where experts.init says (mixture/start.py):
random weights (the paper), the run's trunk, or a pretrained checkpoint. The dense baselines train on the
whole train split, each for a FLOPs budget:
- `matched`: one expert's architecture, from the experts' starting point, for the mixture's whole training
  budget after it: the experts' FLOPs plus every routing FLOP (EM router training, EM scoring, partition
  scoring). At our CPU scale routing costs 13-16% of the experts, so leaving it out would hand the mixture
  free compute. (A trunk's FLOPs are spent once for both, so both end at the same total.)
- `matched-experts`: the same, for the experts' FLOPs only (the paper's match; `dense.experts_only`).
- `bigger`: ~E x one expert's non-embedding size, from scratch, for the mixture's whole training budget
  (trunk included). Not trained with a pretrained start: it could not start from the same weights.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from smalltalk.config import Config, ModelConfig
from smalltalk.data.shards import SplitData, write_subset
from smalltalk.errors import SmalltalkError
from smalltalk.flops import training_flops
from smalltalk.layout import DENSE_KINDS, RunLayout, manifest_of
from smalltalk.mixture.start import expert_spec, expert_train_config, start_flops, start_model
from smalltalk.model import ModelSpec, count_params, resolve_spec
from smalltalk.routing.partition import load_share
from smalltalk.training.trainer import TrainJob, train


def train_expert(cfg: Config, run: RunLayout, index: int, resume: bool = True) -> dict:
    """Train expert `index` on its share (resumes from its checkpoints when present). Reads RUN/experts-data/KK
    when `smalltalk experts data` wrote it (then RUN/data and RUN/partition need not be on this machine),
    else its share's ids of RUN/data: the same tokens in the same order either way."""
    start = start_model(cfg, run)  # first: a wrong checkpoint or a missing trunk fails before any data is read
    own = run.expert_data(index)
    if manifest_of(own).is_file():
        data, val, ids = SplitData(own, "train"), SplitData(own, "validation"), None
    else:
        experts = run.num_experts()
        if not 0 <= index < experts:
            raise SmalltalkError(f"expert {index} does not exist (the partition has {experts})")
        data, val = SplitData(run.data, "train"), SplitData(run.data, "validation")
        ids = load_share(run.partition, index)
    job = TrainJob(expert_spec(cfg, data.vocab_size), expert_train_config(cfg, index), data, run.expert(index),
                   ids=ids, val=val if len(val) else None, name=f"expert {index:02d}", init_from=start)
    return train(job, resume=resume)


def write_expert_data(cfg: Config, run: RunLayout, experts: list[int] | None = None) -> list[Path]:
    """Each expert's share of RUN/data, plus the validation sample its trainer scores, as RUN/experts-data/KK:
    copy that directory (and RUN/config.json) to a machine and the expert trains there without the corpus."""
    data, val = SplitData(run.data, "train"), SplitData(run.data, "validation")
    val_ids = val.sample(cfg.train.eval_batches * cfg.train.micro_batch_size)  # what train's _val_loss draws
    written = []
    for k in range(run.num_experts()) if experts is None else experts:
        write_subset(data, load_share(run.partition, k), run.expert_data(k), val, val_ids)
        written.append(run.expert_data(k))
    return written


def dense_kinds(cfg: Config) -> list[str]:
    """The dense baselines a config asks for."""
    bigger = cfg.dense.bigger and cfg.experts.init != "pretrained"
    wanted = {"matched": True, "matched-experts": cfg.dense.experts_only, "bigger": bigger}
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


def train_dense(cfg: Config, run: RunLayout, kind: str = "matched", resume: bool = True) -> dict:
    """Dense baseline on the whole train split, sized against the trained experts."""
    experts = run.num_experts()
    data, val = SplitData(run.data, "train"), SplitData(run.data, "validation")
    spec = expert_spec(cfg, data.vocab_size)
    tc, init_from = cfg.train, None
    if kind in ("matched", "matched-experts"):
        init_from = start_model(cfg, run)
        budget = mixture_training_flops(run) - start_flops(run) if kind == "matched" else experts_training_flops(run)
        train_cfg = matched_config(tc, budget, training_flops(spec, tc.seq_len or data.seq_len, 1, 1), experts,
                                   cfg.dense.match)
    elif kind == "bigger":
        spec = bigger_spec(spec, experts, cfg.dense.bigger_preset)
        budget = mixture_training_flops(run)
        seq = tc.seq_len or data.seq_len
        per_step = training_flops(spec, seq, tc.micro_batch_size * tc.grad_accum, 1)
        steps = max(1, round(budget / per_step))
        train_cfg = dataclasses.replace(tc, steps=steps, warmup_steps=min(steps // 10, tc.warmup_steps * experts))
    else:
        raise SmalltalkError(f"unknown dense kind {kind!r} (use {', '.join(DENSE_KINDS)})")
    out = run.dense_kind(kind)
    job = TrainJob(spec, train_cfg, data, out, val=val if len(val) else None, name=f"dense {kind}",
                   init_from=init_from)
    summary = train(job, resume=resume)
    summary["non_embedding_ratio_to_expert"] = count_params(spec, False) / count_params(
        expert_spec(cfg, data.vocab_size), False)
    return summary


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


def experts_training_flops(run: RunLayout, accounting: str = "exact") -> float:
    return sum(s["training_flops"][accounting] for s in run.expert_summaries())


def mixture_training_flops(run: RunLayout, accounting: str = "exact") -> float:
    """The mixture's whole budget: the trunk's FLOPs (if any), the experts' and the routing overhead (router
    EM + scoring)."""
    from smalltalk.mixture.run_flops import routing_overhead_flops

    return (start_flops(run, accounting) + experts_training_flops(run, accounting)
            + routing_overhead_flops(run, accounting)["total"])
