"""Dataclass configs, loaded from YAML with dotted command-line overrides (`--set train.lr=3e-4`).

Unknown keys and wrongly typed values are errors that name the key, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from smalltalk.errors import SmalltalkError
from smalltalk.fsutil import write_json


@dataclass
class DataConfig:
    inputs: list[str] = field(default_factory=list)  # files, directories or globs
    text_field: str = "text"
    domain_field: str | None = "domain"  # optional per-document label, kept for diagnostics
    txt_mode: str = "file"  # "file": one document per .txt file; "blocks": split at blank lines
    validation_fraction: float = 0.05
    test_fraction: float = 0.05
    split_seed: int = 0
    order_seed: int = 0  # the seeded order of each split's sequences that every chunk and sample follows
    seq_len: int = 1024
    encode_batch_docs: int = 512  # documents per tokenizers.encode_batch call (parallel in Rust)
    max_docs: int | None = None


@dataclass
class TokenizerConfig:
    vocab_size: int = 32000
    pretrained: str | None = None  # a local HF tokenizer directory instead of training one
    min_frequency: int = 2
    max_train_chars: int | None = None  # cap the text used to fit BPE (first documents of train)
    eot_token: str = "<|endoftext|>"


@dataclass
class ModelConfig:
    preset: str | None = "cpu-expert-0.5m"
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    vocab_size: int | None = None  # None: take it from the tokenizer
    tie_embeddings: bool | None = None
    rope_theta: float | None = None


@dataclass
class TrainConfig:
    steps: int = 1000
    micro_batch_size: int = 16
    grad_accum: int = 1
    seq_len: int | None = None  # train on the first N tokens only (routers: the prefix); None = all
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"  # "cosine" or "constant" (both after linear warmup)
    schedule_steps: int | None = None  # cosine horizon when a job is continued in parts (EM); None = steps
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 0.1
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    dtype: str = "float32"  # "float32" or "bfloat16" (autocast)
    compile: bool = False
    forward: str = "auto"  # the training path: auto, cpu-fused, hf or liger (training/paths.py decides auto)
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 4
    num_threads: int | None = None
    tensorboard: bool = True
    peak_flops: float | None = None  # for MFU; None: measured with a matmul at start-up
    progress: bool = True
    record_consumed: bool = False  # write consumed_ids.npy: every sequence id the job read


@dataclass
class RoutingConfig:
    # "em" (the paper), "ngram" (count-based routers, the same EM), "tfidf", "random" or "oracle" (domain labels:
    # an upper bound for studies)
    method: str = "em"
    experts: int = 4
    prefix: int = 256  # M: tokens the routers see when training and partitioning
    rounds: int = 4  # EM rounds T
    chunk: int = 4096  # N: fresh sequences scored and re-split per round
    router: ModelConfig = field(default_factory=lambda: ModelConfig(preset="cpu-router-0.1m"))
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=200, lr=1e-3, schedule="constant", warmup_steps=50, micro_batch_size=32, log_every=50
        )
    )
    score_batch_size: int = 256  # sequences per scoring batch
    score_workers: int | None = None  # routers scored at once; None: one per CPU thread (1 on GPU)
    partition_chunk: int | None = 65536  # sequences per balanced assignment; memory is O(chunk x E)
    partition_part_chunks: int = 64  # chunks per resumable part when one process partitions everything
    heldout_sequences: int = 256  # validation sequences for the per-round held-out loss
    parallel: int = 1  # router jobs run at once within a round
    seed: int = 0
    compile: bool = False  # torch.compile the routers for `partition` (~20 s per router; 0-10% on CPU)
    # EM levers (docs/routing.md, benchmarks/studies/routing_study.py)
    router_init: str = "shared"  # "shared": every router from routing.train.seed; "distinct": router e from seed + e
    init_split: str = "random"  # round 0's split: "random" (the paper) or "tfidf" (balanced k-means, as c-BTM)
    # the oracle reference's groups of domain labels: "balanced" (near-equal sizes) or "similar" (related
    # domains together, by tf-idf domain centroids: routing/baselines.similar_groups)
    oracle_grouping: str = "balanced"
    # M-step length in passes over a router's share: 1 is the paper's (each sequence of the fresh chunk seen
    # once per round); null: routing.train.steps per round whatever the share (a departure, named so)
    share_passes: float | None = 1.0
    # method=ngram (routing/ngram.py): count-based n-gram routers trained by the same EM
    ngram_order: int = 2  # tokens per n-gram (2: each token given the one before it)
    ngram_prior: float | None = None  # Dirichlet pseudo-counts toward the router's unigram; None: the vocabulary size
    ngram_decay: float = 0.5  # weight of earlier rounds' counts, per round
    ngram_buckets: int = 1 << 20  # table cells per router; above it n-grams are hashed into it

    def steps_per_round(self) -> int:
        """Optimizer steps of each router in each EM round (the M-step)."""
        if self.share_passes is None:
            return self.train.steps
        batch = self.train.micro_batch_size * self.train.grad_accum
        return max(1, math.ceil(self.share_passes * self.chunk / self.experts / batch))


# Settings added after runs existed, left out of stage digests and EM state while at the value that
# reproduces the old behaviour: a run made before they existed still resumes.
ADDED_LATER = {"routing": {"router_init": "shared", "init_split": "random", "share_passes": None,
                           "oracle_grouping": "balanced", "ngram_order": 2, "ngram_prior": None, "ngram_decay": 0.5,
                           "ngram_buckets": 1 << 20},
               "experts": {"init": "scratch", "trunk_fraction": 0.25, "pretrained": None}}


@dataclass
class RefineConfig:
    """Router refinement from the experts (experts/refine.py): a departure from the paper, off at 0."""

    sequences: int = 0  # training sequences relabelled by the expert with the lowest loss; 0: off (the paper)
    passes: float = 1.0  # fine-tuning passes of each router over the prefixes labelled with its expert
    lr: float | None = None  # None: routing.train.lr
    heldout_sequences: int = 1024  # validation sequences for the agreement and perplexity figures


# Whole sections added after runs existed: left out of stage digests while at their defaults.
SECTIONS_ADDED_LATER = ("refine",)

# Defaults changed after runs existed, with the value they had: a stage finished under the old default still
# counts as done when the config leaves the key at its new default (its figures stay the old default's).
DEFAULTS_CHANGED = {"eval": {"top_k_temperatures": [1.0, 16.0]}}  # 32: chosen on validation (issue #27)


@dataclass
class ExpertsConfig:
    parallel: int = 1  # expert (and dense) jobs at once on this machine (threads are split between them)
    materialize: bool = False  # write each share as RUN/experts-data/KK first (expert jobs then need only it)
    # Where every expert starts (experts/start.py): "scratch" (the paper), "trunk" (a dense model of the
    # experts' architecture trained on all the data first, as BTM / c-BTM) or "pretrained" (a local HF
    # Llama checkpoint, as BTX / FlexOlmo). Departures from the paper, each a named option.
    init: str = "scratch"
    trunk_fraction: float = 0.25  # init=trunk: the share of the experts' budget (E x train.steps) the trunk spends
    pretrained: str | None = None  # init=pretrained: the checkpoint directory (its tokenizer becomes the run's)


@dataclass
class DenseConfig:
    # Every dense model trains for a FLOPs budget with one schedule (experts/dense.py). `matched`, the headline
    # baseline: one expert's architecture from scratch (or from the pretrained checkpoint the experts start
    # from) for the mixture's whole budget: trunk + experts + every routing FLOP.
    match: str = "steps"  # spend the budget in more steps at the expert's batch; "batch": a larger batch (paper)
    experts_only: bool = True  # also train `matched-experts` (the paper's match, routing left out)
    from_trunk: bool = False  # experts.init=trunk: also `matched-trunk`, continued from the experts' trunk
    inference: bool = True  # also `inference`: per sequence the mixture's inference FLOPs (routers + one expert)
    bigger: bool = True  # also `bigger`: per sequence the top-k mixture's inference FLOPs (c-BTM's protocol)
    bigger_k: int | None = None  # k of that match; None: every expert (k = E)
    bigger_preset: str | None = None  # a preset instead of the inference-matched size


@dataclass
class EvalConfig:
    split: str = "validation"  # what every choice is made on; the test split only via `smalltalk eval --final`
    prefixes: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128, 256])
    main_prefix: int | None = None  # prefix for per-expert/per-domain tables; None: routing.prefix
    batch_size: int = 32
    max_sequences: int | None = None
    device: str = "auto"
    top_k: list[int] = field(default_factory=lambda: [1, 2, 4])  # c-BTM-style ensembles of the top-k experts
    top_k_temperatures: list[float] = field(default_factory=lambda: [1.0, 32.0])  # 32: studies/demo_choices.py
    score_all_experts: bool = False  # also every expert on every sequence: the expert x domain table (E x cost)


@dataclass
class SFTConfig:
    """Routed post-training (`smalltalk sft`, or the `sft` stage of `smalltalk run` when enabled)."""

    enabled: bool = False  # `smalltalk run` runs the sft stage (then sft.data is required)
    data: str | None = None  # instruction file, or a directory of train/validation/test files
    route_on: str = "user_text"  # the first user message alone (measured better: docs/post-training.md), or
    # "prompt": the chat-formatted prompt (its template tokens then fill part of the routing prefix)
    replay: float = 0.0  # pre-training sequences mixed into each job, as a share of its instruction examples
    epochs: float = 3.0  # passes over each expert's routed examples (the dense baseline: the same total steps)
    lr: float = 3e-4
    micro_batch_size: int = 16
    warmup_steps: int = 10


@dataclass
class Config:
    run_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    dense: DenseConfig = field(default_factory=DenseConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a Config from an optional YAML file and `key.sub=value` overrides (values parsed as YAML)."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise SmalltalkError(f"config file not found: {path}", fix="pass an existing YAML file to --config")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise SmalltalkError(f"config file is not valid YAML: {exc}", where=str(path)) from exc
        if not isinstance(raw, dict):
            raise SmalltalkError("config file must hold a mapping at top level", where=str(path))
        source = str(path)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SmalltalkError(f"bad override {item!r}", fix="write overrides as --set section.key=value")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SmalltalkError(f"override {item!r}: '{part}' is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return _checked(_build(Config, raw, prefix="", source=source), source)


FORWARDS = ("auto", "cpu-fused", "hf", "liger")  # training paths; training/paths.py decides `auto`
ROUTING_METHODS = ("em", "ngram", "tfidf", "random", "oracle")  # routing/methods.py has a trainer for each


def _checked(cfg: Config, source: str) -> Config:
    """Values that are wrong whatever the data: refused at load, before any stage runs."""
    if cfg.routing.method not in ROUTING_METHODS:
        raise SmalltalkError(f"unknown routing.method {cfg.routing.method!r}", where=source,
                             fix=f"use one of {', '.join(ROUTING_METHODS)}")
    if cfg.routing.experts < 2:
        raise SmalltalkError(f"routing.experts={cfg.routing.experts}: a mixture needs at least 2 experts",
                             where=source)
    if cfg.routing.prefix < 2 or cfg.routing.prefix > cfg.data.seq_len:
        raise SmalltalkError(f"routing.prefix={cfg.routing.prefix} must be in [2, data.seq_len={cfg.data.seq_len}]",
                             where=source)
    for key, allowed in (("router_init", ("shared", "distinct")), ("init_split", ("random", "tfidf")),
                         ("oracle_grouping", ("balanced", "similar"))):
        if getattr(cfg.routing, key) not in allowed:
            raise SmalltalkError(f"routing.{key}={getattr(cfg.routing, key)!r}", where=source,
                                 fix=f"use one of {', '.join(allowed)}")
    if cfg.sft.route_on not in ("prompt", "user_text") or not 0 <= cfg.sft.replay <= 10 or cfg.sft.epochs <= 0:
        raise SmalltalkError(f"sft.route_on={cfg.sft.route_on!r}, sft.replay={cfg.sft.replay}, sft.epochs="
                             f"{cfg.sft.epochs}", where=source,
                             fix="route_on: prompt or user_text; replay in [0, 10]; epochs > 0")
    for key, train_cfg in (("train", cfg.train), ("routing.train", cfg.routing.train)):
        if train_cfg.forward not in FORWARDS:
            raise SmalltalkError(f"{key}.forward={train_cfg.forward!r}", where=source,
                                 fix=f"use one of {', '.join(FORWARDS)} (training/paths.py)")
    _check_experts_init(cfg, source)
    rf = cfg.refine
    if rf.sequences < 0 or rf.passes <= 0 or rf.heldout_sequences < 0 or (rf.lr is not None and rf.lr <= 0):
        raise SmalltalkError(f"refine.sequences={rf.sequences}, refine.passes={rf.passes}, refine.lr={rf.lr}, "
                             f"refine.heldout_sequences={rf.heldout_sequences}", where=source,
                             fix="sequences >= 0 (0: off), passes > 0, lr > 0 or null, heldout_sequences >= 0")
    if rf.sequences and cfg.routing.method != "em":
        raise SmalltalkError(f"refine.sequences={rf.sequences} with routing.method={cfg.routing.method}: refinement "
                             "fine-tunes router LMs, which only `em` trains", where=source,
                             fix="set refine.sequences=0, or routing.method=em")
    bad = [p for p in cfg.eval.prefixes if not 2 <= p <= cfg.data.seq_len]
    if bad:
        raise SmalltalkError(f"eval.prefixes {bad} are outside [2, data.seq_len={cfg.data.seq_len}]", where=source,
                             fix="drop them from eval.prefixes")
    return cfg


EXPERT_INITS = ("scratch", "trunk", "pretrained")  # experts/start.py


def _check_experts_init(cfg: Config, source: str) -> None:
    ex = cfg.experts
    if ex.init not in EXPERT_INITS:
        raise SmalltalkError(f"experts.init={ex.init!r}", where=source, fix=f"use one of {', '.join(EXPERT_INITS)}")
    if ex.init == "trunk" and not 0 < ex.trunk_fraction < 1:
        raise SmalltalkError(f"experts.trunk_fraction={ex.trunk_fraction} with experts.init=trunk", where=source,
                             fix="use a fraction in (0, 1) of the experts' budget; experts.init=scratch for none")
    if ex.init == "pretrained":
        if not ex.pretrained:
            raise SmalltalkError("experts.init=pretrained needs experts.pretrained", where=source,
                                 fix="set experts.pretrained to a local Hugging Face Llama checkpoint directory")
        if not Path(ex.pretrained).is_dir():
            raise SmalltalkError(f"experts.pretrained={ex.pretrained}: no such directory", where=source,
                                 fix="point it at a local Hugging Face Llama checkpoint directory")
    elif ex.pretrained:
        raise SmalltalkError(f"experts.pretrained={ex.pretrained} with experts.init={ex.init}: it would be ignored",
                             where=source, fix="set experts.init=pretrained, or drop experts.pretrained")


def _build(cls: type, raw: dict[str, Any], prefix: str, source: str) -> Any:
    if not isinstance(raw, dict):
        raise SmalltalkError(f"config key '{prefix.rstrip('.')}' must be a mapping", where=source)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise SmalltalkError(
            f"unknown config key '{prefix}{unknown[0]}'",
            where=source,
            fix=f"valid keys under '{prefix.rstrip('.') or 'top level'}': {', '.join(sorted(names))}",
        )
    kwargs = {}
    defaults = cls()
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise SmalltalkError(f"config key '{prefix}{name}' must be a mapping", where=source)
            merged = dataclasses.asdict(getattr(defaults, name))
            merged.update(value)
            kwargs[name] = _build(hint, merged, f"{prefix}{name}.", source)
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}", source)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check `value` against a simple type hint (int, float, str, bool, list[str], X | None)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        hint = next(a for a in options if a is not type(None))
        origin = typing.get_origin(hint)
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise SmalltalkError(f"config key '{key}' must be a list, got {value!r}", where=source)
        return [_coerce(v, typing.get_args(hint)[0], key, source) for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise SmalltalkError(
        f"config key '{key}' must be {getattr(hint, '__name__', hint)}, got {value!r}", where=source
    )


def save_config(cfg: Config, path: str | Path) -> None:
    """The resolved config as JSON (YAML reads it back): RUN/config.json, which every later job of a run
    (child processes, SLURM tasks, `experts add`) loads instead of re-parsing the command line that made it."""
    write_json(path, dataclasses.asdict(cfg))
