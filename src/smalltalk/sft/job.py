"""`smalltalk sft`: route every instruction example once, fine-tune each expert on its own, and a dense baseline.

Each example is routed by the mixture's routers on its first M tokens: of the chat-formatted prompt
(`sft.route_on: prompt`, what the server routes on at inference) or of the first user message alone
(`user_text`). Expert k then fine-tunes from its pre-trained weights on the training examples routed to
it (+ `sft.replay` x as many of its own pre-training sequences, against forgetting) for `sft.epochs`
passes, as an independent, resumable job of the same trainer; an expert that receives no example keeps
its weights. The dense baseline (one expert's size, `RUN/dense/matched`) fine-tunes on every example (+
replay from the whole train split) for as many steps as all experts together. The output directory
(default RUN/sft) is a mixture of its own: generate, serve, export and lm-eval take it as --run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import shutil
from pathlib import Path

import numpy as np

from smalltalk.config import Config
from smalltalk.data.chat import CHAT_TEMPLATE, encode
from smalltalk.data.shards import SplitData
from smalltalk.data.tokenizer import encode_text
from smalltalk.errors import SmalltalkError
from smalltalk.fsutil import atomic_dir, read_json, write_json
from smalltalk.layout import RunLayout, SFTFiles, TrainFiles, manifest_of
from smalltalk.llama import spec_from_hf
from smalltalk.mixture.export import copy_routers
from smalltalk.mixture.model import SmallTalkMixture
from smalltalk.routing.assignment import argmax_assignment
from smalltalk.sft.data import SFTData, pack_rows, write_rows
from smalltalk.sft.examples import read_examples, split_files
from smalltalk.training.trainer import TrainJob, train


def encode_split(tokenizer, examples: list[dict], seq_len: int) -> tuple[list, int]:
    """Encoded examples, each cut to seq_len tokens (counted, never silently: the manifest says how many)."""
    encoded, cut = [], 0
    for example in examples:
        ids, mask = encode(tokenizer, example["messages"])
        if len(ids) > seq_len:
            ids, mask, cut = ids[:seq_len], mask[:seq_len], cut + 1
        encoded.append((ids, mask))
    return encoded, cut


def routing_ids(tokenizer, example: dict, encoded: tuple[list, list], route_on: str) -> list[int]:
    """What the routers score: the prompt up to the last answer, or the first user message's text."""
    if route_on == "user_text":
        return encode_text(tokenizer, next(m["content"] for m in example["messages"] if m["role"] == "user"))
    ids, mask = encoded
    last_answer = len(mask) - next(i for i, m in enumerate(reversed(mask)) if not m)  # after the last prompt token
    return ids[:last_answer]


def route(mixture: SmallTalkMixture, sequences: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(expert, scores) of each token list from its first M tokens (fewer when it is shorter)."""
    scores = np.zeros((len(sequences), mixture.num_experts))
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(sequences):
        by_length.setdefault(min(mixture.prefix, len(ids)), []).append(i)
    for length, rows in by_length.items():
        if length < 2:
            raise SmalltalkError(f"{len(rows)} example(s) have fewer than 2 tokens to route on")
        scores[rows] = mixture.routers.score(np.array([sequences[i][:length] for i in rows]))
    return argmax_assignment(scores), scores


def run_sft(cfg: Config, run: RunLayout, data: Path, out: Path | None = None, only: list[str] | None = None) -> dict:
    """only: the jobs to run here ("0", "1", ..., "dense"), e.g. one per machine; the mixture directory is
    written by the call that finds every job done (routing is deterministic, so each call agrees on it)."""
    sft = SFTFiles(Path(out) if out else run.sft.root)
    run.check_output(sft.root, "sft --out", allowed=(run.sft.root,))
    target = RunLayout(sft.root)
    if target.has_mixture() and "sft" not in read_json(target.mixture_file):
        raise SmalltalkError(f"sft --out {sft.root} holds a mixture that no `smalltalk sft` wrote",
                             fix="choose a new directory (default RUN/sft)")
    if "elastic" in run.mixture():
        raise SmalltalkError("sft of a mixture edited by `experts add/remove` is not supported yet")
    mixture = SmallTalkMixture.from_pretrained(run.root)
    tokenizer = mixture.tokenizer
    tokenizer.chat_template = CHAT_TEMPLATE
    seq_len = mixture.expert(0).config.max_position_embeddings
    files = split_files(Path(data))
    splits = {split: read_examples(path) for split, path in files.items()}
    if not splits["train"]:
        raise SmalltalkError("no training examples", where=str(files["train"]), fix="give at least one example")
    settings = _settings(cfg, files)
    if sft.examples.is_file() and read_json(sft.examples).get("settings") != settings:
        raise SmalltalkError(f"{sft.root} was made from other instruction data or sft settings",
                             fix="pass --out NEW_DIR for the new settings (or delete the old directory)")
    encoded, cut = {}, {}
    for split, examples in splits.items():
        encoded[split], cut[split] = encode_split(tokenizer, examples, seq_len)
    chosen = {split: route(mixture, [routing_ids(tokenizer, ex, enc, cfg.sft.route_on)
                                     for ex, enc in zip(splits[split], encoded[split], strict=True)])[0]
              for split in splits}
    sft.root.mkdir(parents=True, exist_ok=True)
    write_json(sft.examples, {"settings": settings, "route_on": cfg.sft.route_on, "cut_to_context": cut, "splits": {
        split: [{"expert": int(k), "domain": ex["domain"]} for ex, k in zip(splits[split], chosen[split], strict=True)]
        for split in splits}})
    steps = _train_experts(cfg, run, mixture, sft, encoded["train"], chosen["train"], seq_len, tokenizer, only)
    dense = _train_dense(cfg, run, sft, encoded["train"], sum(steps), seq_len, tokenizer) \
        if only is None or "dense" in only else None
    if all(TrainFiles(sft.job(f"experts/{k:02d}")).model.is_dir() for k in range(mixture.num_experts)):
        _write_mixture(run, sft, tokenizer, mixture.num_experts, cfg.sft.route_on)
    summary = {"examples": {s: len(e) for s, e in splits.items()}, "cut_to_context": cut, "expert_steps": steps,
               "dense_steps": dense, "route_on": cfg.sft.route_on, "replay": cfg.sft.replay}
    print(f"sft: {summary}", flush=True)
    return summary


def _settings(cfg: Config, files: dict[str, Path]) -> dict:
    """What the jobs' outputs depend on: a rerun into the same directory must match it (else it would mix)."""
    sha = {split: hashlib.sha256(path.read_bytes()).hexdigest()[:16] for split, path in files.items()}
    return {"sft": {k: v for k, v in dataclasses.asdict(cfg.sft).items() if k not in ("enabled", "data")},
            "data_sha256": sha, "train_seed": cfg.train.seed}


def _job_config(cfg: Config, steps: int, seed: int):
    s = cfg.sft
    return dataclasses.replace(cfg.train, steps=steps, lr=s.lr, micro_batch_size=s.micro_batch_size, grad_accum=1,
                               warmup_steps=min(s.warmup_steps, max(steps // 2, 1)), seq_len=None, seed=seed,
                               eval_every=0, record_consumed=False, schedule_steps=None,
                               log_every=max(1, min(cfg.train.log_every, steps)))


def _replay(data: SplitData, ids: np.ndarray, n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """n pre-training sequences of `ids`, drawn by a seeded permutation; loss on every token."""
    if n == 0 or len(ids) == 0:
        return []
    picked = np.sort(np.random.default_rng(seed).permutation(ids)[:n])
    rows = data.batch(picked)
    return [(row.tolist(), [1] * len(row)) for row in rows]


def _fine_tune(cfg: Config, name: str, sft: SFTFiles, rows: list, seq_len: int, tokenizer, init_from: Path,
               seed: int) -> int:
    """One fine-tuning job (resumable): returns its steps."""
    steps = max(1, math.ceil(cfg.sft.epochs * len(rows) / cfg.sft.micro_batch_size))
    data_dir, spec = sft.job_data(name), spec_from_hf(_hf_config(init_from))
    if not manifest_of(data_dir).is_file():
        tokens, labels = pack_rows(rows, seq_len, tokenizer.eos_token_id)
        write_rows(data_dir, tokens, labels, spec.vocab_size, {"init_from": str(init_from)})
    data = SFTData(data_dir)
    if not TrainFiles(sft.job(name)).done(steps):
        train(TrainJob(spec, _job_config(cfg, steps, seed), data, sft.job(name), name=f"sft {name}",
                       init_from=init_from), resume=TrainFiles(sft.job(name)).checkpoints.exists())
    return steps


def _hf_config(model_dir: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_dir))


def _train_experts(cfg: Config, run: RunLayout, mixture: SmallTalkMixture, sft: SFTFiles, encoded: list,
                   chosen: np.ndarray, seq_len: int, tokenizer, only: list[str] | None) -> list[int]:
    """Each expert's steps (computed for all, so the dense baseline's total is the same wherever it runs)."""
    from smalltalk.routing.partition import load_share

    pretrain = SplitData(run.data, "train") if cfg.sft.replay else None
    steps = []
    for k in range(mixture.num_experts):
        own = [encoded[i] for i in np.flatnonzero(chosen == k)]
        expert_model = run.root / mixture.manifest["expert_dirs"][k]
        mine = only is None or str(k) in only
        if not own:  # nothing routed here: the expert keeps its pre-trained weights
            target = TrainFiles(sft.job(f"experts/{k:02d}")).model
            if mine and not target.exists():  # all or nothing: a kill mid-copy leaves no half model
                with atomic_dir(target) as tmp:
                    shutil.copytree(expert_model, tmp, copy_function=_link, dirs_exist_ok=True)
            steps.append(0)
            continue
        if not mine:
            steps.append(max(1, math.ceil(cfg.sft.epochs * (len(own) + round(cfg.sft.replay * len(own)))
                                          / cfg.sft.micro_batch_size)))
            continue
        replay = _replay(pretrain, load_share(run.partition, k), round(cfg.sft.replay * len(own)), cfg.train.seed + k) \
            if pretrain is not None else []
        steps.append(_fine_tune(cfg, f"experts/{k:02d}", sft, own + replay, seq_len, tokenizer, expert_model,
                                cfg.train.seed + k))
    return steps


def _train_dense(cfg: Config, run: RunLayout, sft: SFTFiles, encoded: list, total_steps: int, seq_len: int,
                 tokenizer) -> int | None:
    dense_model = TrainFiles(run.dense_kind("matched")).model
    if not dense_model.is_dir():
        print("sft: no RUN/dense/matched model, so no dense baseline", flush=True)
        return None
    pretrain = SplitData(run.data, "train") if cfg.sft.replay else None
    replay = _replay(pretrain, np.arange(len(pretrain)), round(cfg.sft.replay * len(encoded)), cfg.train.seed) \
        if pretrain is not None else []
    rows = encoded + replay
    epochs = total_steps * cfg.sft.micro_batch_size / len(rows)  # as many steps as all experts together
    dense_cfg = dataclasses.replace(cfg, sft=dataclasses.replace(cfg.sft, epochs=epochs))
    return _fine_tune(dense_cfg, "dense", sft, rows, seq_len, tokenizer, dense_model, cfg.train.seed)


def _link(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system
        shutil.copy2(source, target)


def _write_mixture(run: RunLayout, sft: SFTFiles, tokenizer, experts: int, route_on: str) -> None:
    """RUN/sft as a mixture directory: tokenizer with the chat template, the run's routers, SFT experts."""
    target = RunLayout(sft.root)
    with atomic_dir(target.tokenizer) as tmp:  # each piece all or nothing: a kill leaves the old or the new
        tokenizer.save_pretrained(str(tmp))
    if not manifest_of(target.routers).is_file():
        with atomic_dir(target.routers) as tmp:
            copy_routers(run, tmp, copy=_link)
    manifest = {**run.mixture(), "tokenizer": str(target.tokenizer.relative_to(sft.root)),
                "routers": str(target.routers.relative_to(sft.root)),
                "expert_dirs": [str(TrainFiles(sft.job(f"experts/{k:02d}")).model.relative_to(sft.root))
                                for k in range(experts)],
                "sft": {"from": str(run.root), "route_on": route_on}}
    write_json(target.mixture_file, manifest)
