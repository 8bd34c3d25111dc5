"""Where every expert starts: from scratch (the paper), a shared trunk, or a pretrained model.

The paper trains each expert from random weights. Its peers branch: BTM and c-BTM from a seed LM trained on
all the data, BTX and FlexOlmo from a pretrained model. `experts.init` names the choice:
- `scratch`: random weights; each expert trains `train.steps` steps (the paper).
- `trunk`: one dense model of the experts' architecture trains on the whole train split (its own seeded
  order) for `trunk_fraction` of the experts' budget, E x train.steps steps at the experts' batch; each
  expert then continues from it for (1 - trunk_fraction) x train.steps steps, fresh optimizer and
  schedule, as an independent job. The total training compute is the scratch mixture's.
- `pretrained`: every expert continues from a local HF Llama checkpoint for train.steps steps; its
  architecture replaces `model`, its tokenizer is the run's (the routers are trained with it).
The dense baselines start where the experts start (experts/dense.py), so mixture and dense stay matched.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from smalltalk.config import Config, TrainConfig
from smalltalk.errors import SmalltalkError
from smalltalk.layout import RunLayout, TokenizerFiles, TrainFiles
from smalltalk.llama import ModelSpec, pretrained_spec, resolve_spec

TRUNK_SEED_OFFSET = 7919  # the trunk's order and init differ from every expert's (seed + k) and the dense model's


def trunk_steps(cfg: Config) -> int:
    """The trunk's optimizer steps: trunk_fraction of the experts' E x train.steps, at the experts' batch."""
    return max(1, round(cfg.experts.trunk_fraction * cfg.routing.experts * cfg.train.steps))


def expert_steps(cfg: Config) -> int:
    """Each expert's optimizer steps: what is left of train.steps after the trunk's share."""
    return steps_after_start(cfg.train.steps, cfg.experts.init, cfg.experts.trunk_fraction)


def steps_after_start(train_steps: int, init: str, trunk_fraction: float) -> int:
    """expert_steps from plain values (`smalltalk status` reads them from RUN/config.json)."""
    return train_steps if init != "trunk" else max(1, round((1 - trunk_fraction) * train_steps))


def expert_train_config(cfg: Config, index: int) -> TrainConfig:
    """Expert `index`'s trainer settings: its own seed, the steps its start leaves it."""
    steps = expert_steps(cfg)
    return dataclasses.replace(cfg.train, record_consumed=True, seed=cfg.train.seed + index, steps=steps,
                               warmup_steps=min(cfg.train.warmup_steps, steps))


def expert_spec(cfg: Config, vocab_size: int) -> ModelSpec:
    """The experts' architecture: `model`, or the pretrained checkpoint's own."""
    if cfg.experts.init == "pretrained":
        return pretrained_spec(Path(cfg.experts.pretrained), vocab_size)
    return resolve_spec(cfg.model, vocab_size)


def start_model(cfg: Config, run: RunLayout) -> Path | None:
    """The HF model directory every expert (and the dense model of their architecture) starts from; None:
    random weights. The trunk must be trained first."""
    if cfg.experts.init == "pretrained":
        check_pretrained_tokenizer(Path(cfg.experts.pretrained), run)
        return Path(cfg.experts.pretrained)
    if cfg.experts.init == "trunk":
        files = TrainFiles(run.trunk)
        if not files.done(trunk_steps(cfg)):
            raise SmalltalkError(f"experts.init=trunk but {run.trunk} holds no finished trunk",
                                 fix="run `smalltalk trunk train --run RUN` (or `smalltalk run`) first; an expert "
                                     "job on another machine needs RUN/trunk copied there with its data")
        return files.model
    return None


def train_trunk(cfg: Config, run: RunLayout, resume: bool = True) -> dict:
    """The trunk: the experts' architecture on the whole train split. Resumes from its checkpoints."""
    from smalltalk.data.shards import SplitData
    from smalltalk.training.trainer import TrainJob, train

    if cfg.experts.init != "trunk":
        raise SmalltalkError(f"experts.init={cfg.experts.init}: this run has no trunk",
                             fix="set experts.init=trunk (and experts.trunk_fraction)")
    data, val = SplitData(run.data, "train"), SplitData(run.data, "validation")
    steps = trunk_steps(cfg)
    train_cfg = dataclasses.replace(cfg.train, steps=steps, seed=cfg.train.seed + TRUNK_SEED_OFFSET,
                                    warmup_steps=min(cfg.train.warmup_steps, steps))
    job = TrainJob(resolve_spec(cfg.model, data.vocab_size), train_cfg, data, run.trunk,
                   val=val if len(val) else None, name="trunk")
    return train(job, resume=resume)


def check_pretrained_tokenizer(directory: Path, run: RunLayout) -> None:
    """The run's data must be encoded with the checkpoint's own tokenizer (same token -> id map), and its
    embeddings must have a row per token. Without RUN/tokenizer here (an expert job given only its own data),
    the trainer checks the vocabulary size against the data instead."""
    from tokenizers import Tokenizer

    theirs, ours = TokenizerFiles(directory).tokenizer_json, TokenizerFiles(run.tokenizer).tokenizer_json
    if not theirs.is_file():
        raise SmalltalkError(f"{directory} has no tokenizer.json", where=str(directory),
                             fix="save the model's fast tokenizer next to it (tokenizer.save_pretrained(DIR))")
    if not ours.is_file():
        return  # the tokenizer stage adopts the checkpoint's own (data/tokenizer.py)
    a = Tokenizer.from_file(str(theirs)).get_vocab(with_added_tokens=True)
    b = Tokenizer.from_file(str(ours)).get_vocab(with_added_tokens=True)
    if a != b:
        differ = sum(1 for tok, i in a.items() if b.get(tok) != i) + len(set(b) - set(a))
        raise SmalltalkError(f"the tokenizer of {directory} differs from the run's ({run.tokenizer}): {differ} "
                             f"tokens map to other ids ({len(a)} vs {len(b)} tokens)", where=str(theirs),
                             fix="make the run with experts.init=pretrained from the start (its tokenizer stage "
                                 "adopts the checkpoint's), or use a new --run-dir")
    pretrained_spec(directory, len(b))  # and embeddings of the tokenizer's size
