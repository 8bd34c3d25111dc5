"""FLOPs of a whole SmallTalk run: routing overhead, experts, dense baselines, inference per sequence.

Routing overhead = router training (EM) + scoring the fresh EM chunks + scoring every training sequence
for the partition + refining the routers from the experts (experts/refine.py), when done. Held-out
diagnostics computed during EM and refinement are not counted (they are optional).
"""

from __future__ import annotations

from smalltalk.flops import forward_flops
from smalltalk.fsutil import read_json
from smalltalk.layout import RouterFiles, RunLayout, TrainFiles, manifest_of
from smalltalk.llama import PRESETS, ModelSpec

ACCOUNTINGS = ("exact", "paper")


def router_prefix_flops(manifest: dict, prefix: int, accounting: str = "exact") -> float:
    """FLOPs of one router scoring one prefix of `prefix` tokens: a router LM's forward pass, the n-gram
    routers' look-ups (routing/ngram.OPS_PER_TOKEN per scored token), 0 for tf-idf / random / oracle."""
    if manifest.get("router_spec"):
        return forward_flops(ModelSpec(**manifest["router_spec"]), prefix, 1, accounting)
    if manifest["method"] == "ngram":
        from smalltalk.routing.ngram import OPS_PER_TOKEN

        return float(OPS_PER_TOKEN * (prefix - 1))
    return 0.0


def routing_overhead_flops(run: RunLayout, accounting: str = "exact") -> dict:
    """FLOPs the routing adds to training (0 for tf-idf / random, which train no LM)."""
    manifest = run.routers_manifest()
    zero = {"router_training": 0.0, "em_scoring": 0.0, "partition_scoring": 0.0, "refinement": 0.0, "total": 0.0}
    if not router_prefix_flops(manifest, manifest["prefix"], accounting):
        return zero
    experts, prefix = manifest["experts"], manifest["prefix"]
    if manifest["method"] == "ngram":  # the M-step counts each token of the chunks once
        training = manifest["counted_tokens"] * router_prefix_flops(manifest, 2, accounting)
    else:
        files = RouterFiles(run.routers)
        training = sum(read_json(files.router(name).manifest)["training_flops"][accounting]
                       for name in manifest["routers"])
    training += sum(s["training_flops"][accounting] for s in run.added_router_summaries())  # elastic pairs
    per_prefix = router_prefix_flops(manifest, prefix, accounting)
    em_scoring = (manifest["rounds"] - 1) * manifest["chunk"] * experts * per_prefix
    partition = run.partition_manifest()
    per_partition_prefix = router_prefix_flops(manifest, partition["prefix"], accounting)
    partition_scoring = partition["sequences"] * experts * per_partition_prefix
    refined = manifest_of(run.routers_refined)
    refinement = read_json(refined)["flops"][accounting]["total"] if refined.is_file() else 0.0
    return {"router_training": training, "em_scoring": em_scoring, "partition_scoring": partition_scoring,
            "refinement": refinement, "total": training + em_scoring + partition_scoring + refinement}


def paper_router_overhead(experts: int, router_steps: int, router_batch: int, router_seq: int, prefix: int,
                          expert_steps: int, expert_batch: int, spec: ModelSpec | None = None) -> float:
    """The paper's Table 3 router overhead: E routers (`spec`, the paper's 4.4M by default) trained at (steps,
    batch, seq); every sequence a router trains on and every sequence an expert trains on is scored by all E
    routers on its prefix."""
    spec = spec or PRESETS["paper-router-4.4m"]
    training = experts * 3 * forward_flops(spec, router_seq, router_batch, "paper") * router_steps
    scored = experts * router_steps * router_batch + experts * expert_steps * expert_batch
    return training + scored * experts * forward_flops(spec, prefix, 1, "paper")


def inference_flops(run: RunLayout, expert_spec: ModelSpec, routing_prefix: int, seq_len: int,
                    accounting: str) -> dict:
    """Per test sequence of seq_len tokens: routers on the prefix + one expert on the full sequence."""
    manifest = read_json(manifest_of(run.mixture_routers())) if run.has_mixture() else run.routers_manifest()
    routers = run.mixture()["experts"] if run.has_mixture() else run.routers_manifest()["experts"]  # one per expert
    routing = routers * router_prefix_flops(manifest, routing_prefix, accounting)
    expert = forward_flops(expert_spec, seq_len, 1, accounting)
    return {"routing": routing, "expert": expert, "total": routing + expert, "overhead": routing / expert}


def start_flops(run: RunLayout, accounting: str = "exact") -> float:
    """Training FLOPs spent before the experts branch, in the mixture's budget: the trunk's (0 without one; a
    pretrained model's are not this run's and not counted, as the dense baseline starts from it too)."""
    summary = TrainFiles(run.trunk).summary()
    return summary["training_flops"][accounting] if summary else 0.0


def experts_training_flops(run: RunLayout, accounting: str = "exact") -> float:
    return sum(s["training_flops"][accounting] for s in run.expert_summaries())


def mixture_training_flops(run: RunLayout, accounting: str = "exact") -> float:
    """The mixture's whole budget: the trunk's FLOPs (if any), the experts' and the routing overhead (router
    EM + scoring)."""
    return (start_flops(run, accounting) + experts_training_flops(run, accounting)
            + routing_overhead_flops(run, accounting)["total"])
