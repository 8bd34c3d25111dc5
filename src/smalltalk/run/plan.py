"""`smalltalk plan --config C`: the job list, token budgets, FLOPs and GPU-hours of a config, before running.

FLOPs use the paper's accounting (its Table 3): router overhead counts the E routers' training on full
sequences plus scoring, by all E routers on the prefix, of every sequence a router or an expert trains on.
"""

from __future__ import annotations

import math

from smalltalk.config import Config
from smalltalk.experts.budget import paper_router_overhead, router_prefix_flops
from smalltalk.experts.start import expert_spec, expert_steps, trunk_steps
from smalltalk.flops import forward_flops, training_flops
from smalltalk.llama import ModelSpec, count_params, resolve_spec
from smalltalk.routing.ngram import table_sizes

GPU_PEAKS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "v100": 125e12}  # dense bf16 FLOP/s


def plan(cfg: Config, vocab_size: int | None = None) -> dict:
    rc, tc = cfg.routing, cfg.train
    vocab = _vocab(cfg, vocab_size)
    expert = expert_spec(cfg, vocab)
    router = resolve_spec(rc.router, vocab) if rc.method == "em" else None
    seq = cfg.data.seq_len
    batch = tc.micro_batch_size * tc.grad_accum
    steps, trunk = expert_steps(cfg), trunk_steps(cfg) if cfg.experts.init == "trunk" else 0
    experts_flops = rc.experts * training_flops(expert, seq, batch, steps, "paper")
    trunk_flops = training_flops(expert, seq, batch, trunk, "paper") if trunk else 0.0
    overhead = routing_overhead(cfg, router, steps, batch)
    start = {"trunk": "from the trunk", "pretrained": f"from {cfg.experts.pretrained}",
             "scratch": "from scratch"}[cfg.experts.init]
    jobs = [*([f"trunk: {trunk} steps x batch {batch} x {seq} tokens = {trunk * batch * seq / 1e9:.2f}B tokens of "
               f"the whole train split ({cfg.experts.trunk_fraction:.0%} of the experts' budget)"] if trunk else []),
            *_routing_jobs(cfg),
            *[f"expert {k:02d}: {steps} steps x batch {batch} x {seq} tokens = "
              f"{steps * batch * seq / 1e9:.2f}B tokens, {start}" for k in range(rc.experts)],
            f"dense (matched in full: trunk + experts + routing FLOPs, match={cfg.dense.match}, "
            f"{'from ' + str(cfg.experts.pretrained) if cfg.experts.init == 'pretrained' else 'from scratch'}): "
            f"{(trunk_flops + experts_flops + overhead) / training_flops(expert, seq, 1, 1, 'paper') * seq / 1e9:.2f}"
            "B tokens"
            + (f"; experts only: {rc.experts * steps * batch * seq / 1e9:.2f}B tokens" if cfg.dense.experts_only
               else "")]
    return {"jobs": jobs, "expert_params": count_params(expert), "routers": _routers_line(cfg, router, vocab),
            "tokens_per_expert": steps * batch * seq, "experts_training_flops": experts_flops,
            "trunk_training_flops": trunk_flops, "router_overhead_flops": overhead,
            "total_training_flops": trunk_flops + experts_flops + overhead}


def routing_overhead(cfg: Config, router: ModelSpec | None, expert_steps: int, expert_batch: int) -> float:
    """Routing's training FLOPs. LM routers: the paper's Table 3 accounting. N-gram routers: the same
    sequences scored (every sequence EM counts and every sequence an expert trains on, by all E routers) at
    the look-ups' operations per token and router (experts/budget.py), plus each counted token once.
    tf-idf, random, oracle: 0."""
    rc = cfg.routing
    if rc.method == "em":
        return paper_router_overhead(rc.experts, rc.rounds * rc.steps_per_round(),
                                     rc.train.micro_batch_size * rc.train.grad_accum, cfg.data.seq_len,
                                     rc.prefix, expert_steps, expert_batch, router)
    if rc.method == "ngram":
        counted = rc.rounds * rc.chunk
        scored = counted + rc.experts * expert_steps * expert_batch
        per_token, per_prefix = (router_prefix_flops({"method": "ngram"}, m, "paper") for m in (2, rc.prefix))
        return counted * rc.prefix * per_token + scored * rc.experts * per_prefix
    return 0.0


def _routing_jobs(cfg: Config) -> list[str]:
    rc = cfg.routing
    if rc.method == "em":
        batch = rc.train.micro_batch_size * rc.train.grad_accum
        return [f"routers: {rc.rounds} EM rounds x {rc.experts} router jobs of {rc.steps_per_round()} steps "
                f"(batch {batch}, prefix {rc.prefix}), chunk {rc.chunk} sequences per round",
                "partition: score every training sequence with all routers (torchrun-parallel)"]
    if rc.method == "ngram":
        return [f"routers: {rc.rounds} EM rounds counting order-{rc.ngram_order} n-grams of the prefixes "
                f"({rc.prefix} tokens), chunk {rc.chunk} sequences per round (CPU, no GPU)",
                "partition: every training sequence scored by table look-ups in all routers (CPU, in parts)"]
    return [f"routing: {rc.method} (no router to train)",
            f"partition: every training sequence assigned by {rc.method} (CPU, in parts)"]


def _routers_line(cfg: Config, router: ModelSpec | None, vocab: int) -> str:
    rc = cfg.routing
    if router is not None:
        return f"router {count_params(router) / 1e6:.2f}M params"
    if rc.method == "ngram":
        return f"n-gram routers of order {rc.ngram_order}, {_size(_ngram_bytes(cfg, vocab))} of tables each"
    return f"no routers ({rc.method})"


def _ngram_bytes(cfg: Config, vocab: int) -> float:
    """One n-gram router's float32 count tables: n-grams, contexts, unigrams."""
    pairs, contexts = table_sizes(vocab, cfg.routing.ngram_order, cfg.routing.ngram_buckets)
    return 4.0 * (pairs + contexts + vocab)


def _vocab(cfg: Config, vocab_size: int | None) -> int:
    """The run's vocabulary: given, a pretrained start's (its tokenizer becomes the run's), or the config's."""
    if cfg.experts.init == "pretrained":
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(cfg.experts.pretrained).vocab_size
    return vocab_size or cfg.model.vocab_size or cfg.tokenizer.vocab_size


# Fraction of the bf16 peak that the paper's 4.4M routers reach on one H200 (d 96, head dim 8: memory- and
# launch-bound): 26 TFLOP/s scoring prefixes of 256 tokens under bf16 autocast (benchmarks/checks/gpu_check.sh).
ROUTER_MFU = 0.027


def resources(cfg: Config, peak: float, mfu: float, vocab_size: int | None = None,
              router_mfu: float = ROUTER_MFU) -> list[dict]:
    """Per stage: disk it writes, peak host memory, wall hours on one GPU at `mfu` of `peak` (routers at
    `router_mfu`: tiny models reach a far smaller share of the peak than the experts). Assumes the
    corpus holds exactly what the experts consume (each share read once) plus the validation/test splits."""
    rc, tc = cfg.routing, cfg.train
    vocab = _vocab(cfg, vocab_size)
    expert = expert_spec(cfg, vocab)
    seq, batch, experts = cfg.data.seq_len, tc.micro_batch_size * tc.grad_accum, rc.experts
    n = experts * tc.steps * batch  # training sequences
    token_bytes = 2 if vocab < 65536 else 4
    held_out = 1 / max(1e-9, 1 - cfg.data.validation_fraction - cfg.data.test_fraction)
    chunk = min(rc.partition_chunk or n, n)
    framework = 2**30  # python + torch + one small model, measured ~0.45 GB on CPU (bench_partition_scale.py)
    state = count_params(expert) * (4 + 8)  # fp32 weights + AdamW moments
    rate, router_rate = peak * mfu * 3600, peak * router_mfu * 3600  # FLOPs per GPU-hour
    expert_flops = training_flops(expert, seq, batch, expert_steps(cfg), "paper")
    trunk = trunk_steps(cfg) if cfg.experts.init == "trunk" else 0
    return [
        {"stage": "data", "disk": n * seq * token_bytes * held_out, "memory": framework, "hours": None},
        *([{"stage": "trunk", "disk": state * tc.keep_checkpoints + count_params(expert) * 4,
             "memory": framework + state, "hours": training_flops(expert, seq, batch, trunk, "paper") / rate}]
          if trunk else []),
        *_routing_rows(cfg, vocab, n, chunk, framework, router_rate),
        {"stage": "experts data (optional)", "disk": n * seq * token_bytes, "memory": framework, "hours": None},
        {"stage": "each expert job", "disk": state * tc.keep_checkpoints + count_params(expert) * 4,
         "memory": framework + state, "hours": expert_flops / rate},
        *(_refine_row(cfg, expert, resolve_spec(rc.router, vocab), framework, rate, router_rate)
          if rc.method == "em" else []),
        {"stage": "dense (matched)", "disk": state * tc.keep_checkpoints + count_params(expert) * 4,
         "memory": framework + state, "hours": experts * expert_flops / rate},
    ]


def _routing_rows(cfg: Config, vocab: int, n: int, chunk: int, framework: float, router_rate: float) -> list[dict]:
    """The routers and partition stages. LM routers run on GPUs at `router_rate` FLOPs per GPU-hour; n-gram
    routers and tf-idf / random / oracle need no GPU (their hours: None)."""
    rc, experts = cfg.routing, cfg.routing.experts
    scores = chunk * (experts * 4 * 3 + 8 * 6)  # a chunk's scores, assignment and ids
    if rc.method != "em":
        tables = experts * _ngram_bytes(cfg, vocab) if rc.method == "ngram" else 0.0
        return [{"stage": f"routers ({rc.method})", "disk": tables, "memory": framework + tables, "hours": None},
                {"stage": "partition", "disk": 2 * n * 8, "memory": framework + tables + scores, "hours": None}]
    router = resolve_spec(rc.router, vocab)
    router_train = experts * training_flops(router, cfg.data.seq_len, rc.train.micro_batch_size * rc.train.grad_accum,
                                            rc.rounds * rc.steps_per_round(), "paper")
    scoring = n * experts * forward_flops(router, rc.prefix, 1, "paper")
    return [{"stage": "routers (EM)", "disk": experts * count_params(router) * 12 * (cfg.train.keep_checkpoints + 1),
             "memory": framework + rc.chunk * experts * 4 * 3, "hours": router_train / router_rate},
            {"stage": "partition", "disk": 2 * n * 8, "memory": framework + scores, "hours": scoring / router_rate}]


def _refine_row(cfg: Config, expert, router, framework: float, rate: float, router_rate: float) -> list[dict]:
    """The optional refine stage (experts/refine.py): every expert over the sample, then the routers
    fine-tuned on their prefixes."""
    rf, rc = cfg.refine, cfg.routing
    if not rf.sequences:
        return []
    labelling = rf.sequences * rc.experts * forward_flops(expert, cfg.data.seq_len, 1, "paper")
    tuning = training_flops(router, rc.prefix, 1, math.ceil(rf.passes * rf.sequences), "paper")
    return [{"stage": "refine (optional)", "disk": rc.experts * count_params(router) * 12,
             "memory": framework + count_params(expert) * 4, "hours": labelling / rate + tuning / router_rate}]


def _share(fraction: float) -> str:
    return f"{fraction:.2%}" if fraction == 0 or fraction >= 1e-4 else "< 0.01%"


def format_plan(result: dict, peak: float, mfu: float) -> str:
    hours = result["total_training_flops"] / (peak * mfu) / 3600
    per_expert = result["experts_training_flops"] / len([j for j in result["jobs"] if j.startswith("expert")])
    lines = ["jobs:", *[f"  {j}" for j in result["jobs"]], "",
             f"expert {result['expert_params'] / 1e6:.1f}M params, {result['routers']}, "
             f"{result['tokens_per_expert'] / 1e9:.2f}B tokens per expert",
             "training FLOPs (paper accounting): " + (f"trunk {result['trunk_training_flops'] / 1e19:.2f}e19 + "
                                                      if result.get("trunk_training_flops") else "")
             + f"experts {result['experts_training_flops'] / 1e19:.2f}e19 + routing "
             f"{result['router_overhead_flops'] / 1e19:.2f}e19 = {result['total_training_flops'] / 1e19:.2f}e19 "
             f"(routing {_share(result['router_overhead_flops'] / result['total_training_flops'])})",
             f"GPU-hours at {mfu:.0%} MFU of {peak / 1e12:.0f} TFLOP/s: {hours:,.0f} in all, "
             f"{per_expert / (peak * mfu) / 3600:,.0f} per expert job"]
    if result.get("resources"):
        lines += ["", "| stage | disk written | peak host memory | GPU-hours (one GPU) |", "|---|---|---|---|"]
        for row in result["resources"]:
            hours = "-" if row["hours"] is None else f"{row['hours']:,.1f}"
            lines.append(f"| {row['stage']} | {_size(row['disk'])} | {_size(row['memory'])} | {hours} |")
        lines.append("(disk of `partition` counts its parts too; memory is the process's, not the GPU's; "
                     "-: no GPU, CPU work)")
        lines += _ngram_hint(result["resources"])
    return "\n".join(lines)


def _ngram_hint(rows: list[dict]) -> list[str]:
    """With LM routers, what the count-based routers (the corpus10 configs' default, chosen by the proportions
    study) would save: the routers' and the partition's GPU-hours, spent as CPU table look-ups instead."""
    lm = [r["hours"] for r in rows if r["stage"] in ("routers (EM)", "partition") and r["hours"] is not None]
    if len(lm) < 2:
        return []
    return [f"routing with n-gram counts instead (`--set routing.method=ngram`, configs/corpus10.yaml's default; "
            f"docs/studies/proportions.md): the {sum(lm):,.1f} GPU-hours of routers and partition become CPU work"]


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n / 1e3:,.1f} kB"
