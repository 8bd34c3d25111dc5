"""`smalltalk eval`: the mixture against the dense baselines on the validation split (`--final`: test), with FLOPs.

A run directory is evaluated on its own test split with its training FLOPs; a mixture directory without
the run's training records (`smalltalk export`'s, `smalltalk sft`'s RUN/sft) on the prepared data given
by --data (same tokenizer), with inference FLOPs only and the dense baselines it holds, if any.

Every model's per-token NLL on the test sequences is computed once; each prefix length M̂ of the sweep
then only re-routes. Perplexity = exp(ΣNLL / Σtokens), reported on all tokens (the paper's way) and on
the tokens after the prefix only (the router never saw what is scored). Dense is always scored on
exactly the same tokens.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig

from smalltalk.config import Config
from smalltalk.data.shards import SplitData
from smalltalk.errors import SmalltalkError
from smalltalk.evaluation.tally import MixtureTally
from smalltalk.experts.budget import ACCOUNTINGS, inference_flops, routing_overhead_flops, start_flops
from smalltalk.flops import forward_flops
from smalltalk.fsutil import read_json, sha256_file, write_json, write_text
from smalltalk.layout import DENSE_KINDS, HF_CONFIG, RunLayout, TokenizerFiles, TrainFiles, manifest_of
from smalltalk.llama import spec_from_hf
from smalltalk.mixture.model import SmallTalkMixture
from smalltalk.routing.routers import score_split
from smalltalk.training.distributed import resolve_device
from smalltalk.training.host_memory import keep_freed_memory
from smalltalk.training.nll import batch_nll


def _dense_models(run: RunLayout, device) -> dict:
    from transformers import AutoModelForCausalLM

    found = {}
    for kind in DENSE_KINDS:
        path = TrainFiles(run.dense_kind(kind)).model
        if (path / HF_CONFIG).is_file():
            found[kind] = AutoModelForCausalLM.from_pretrained(str(path)).to(device).eval()
    return found


def _timing(mixture: SmallTalkMixture, data: SplitData, prefix: int, repeats: int = 15) -> dict:
    """Median wall time of routing one sequence vs one expert forward over the full sequence."""
    x = data.batch(np.array([0]))
    route_t, expert_t = [], []
    expert = mixture.expert(0)
    for _ in range(repeats):
        start = time.perf_counter()
        mixture.route(x, prefix)
        route_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        with torch.inference_mode():
            expert(input_ids=torch.from_numpy(x).to(mixture.device))
        expert_t.append(time.perf_counter() - start)
    r, e = statistics.median(route_t), statistics.median(expert_t)
    return {"routing_ms": r * 1e3, "expert_forward_ms": e * 1e3, "ratio": r / e}


def evaluate_run(cfg: Config, run: RunLayout, data_dir: Path | None = None, out_dir: Path | None = None,
                 final: bool = False) -> dict:
    """The mixture vs the dense baselines on `data_dir` (default RUN/data; e.g. RUN/added/NN/data after
    `experts add`), written to `out_dir`/results.json (default RUN/eval). Streams over the split in
    batches (evaluation/tally.py): memory does not grow with the split. The split is eval.split (validation:
    what every choice is made on); `final` evaluates the test split instead, for the final table only."""
    ec = cfg.eval
    if final:
        ec = dataclasses.replace(ec, split="test")
    elif ec.split == "test":
        raise SmalltalkError("eval.split=test outside the final evaluation: choices made on test figures are "
                             "fitted to the test split", fix="evaluate on validation; for the final table run "
                             "`smalltalk eval --final --run RUN` once")
    device = resolve_device(ec.device)
    keep_freed_memory()  # a batch pass: freed activations are reused, not page-faulted in (host_memory.py)
    mixture = SmallTalkMixture.from_pretrained(run.root, str(device), routing_workers=cfg.routing.score_workers,
                                               routing_batch=cfg.routing.score_batch_size)
    trained_here = manifest_of(run.partition).is_file()  # a run, not an exported or SFT mixture directory
    if data_dir is None and not manifest_of(run.data).is_file():
        raise SmalltalkError(f"{run.root} is a mixture directory without prepared data (no data/)",
                             fix="pass --data DIR: data prepared with this mixture's tokenizer, e.g. the "
                                 "run's RUN/data")
    data_dir = _same_tokenizer(run, data_dir) if data_dir is not None else run.data
    data = SplitData(data_dir, ec.split)
    ids, seq = data.sample(ec.max_sequences), data.seq_len
    main_prefix = ec.main_prefix or mixture.prefix
    if not 2 <= main_prefix < seq:
        raise SmalltalkError(f"the main routing prefix M̂={main_prefix} leaves no token to score in sequences of {seq}",
                             fix="set eval.main_prefix below data.seq_len")
    prefixes = sorted({p for p in ec.prefixes if 2 <= p < seq} | {main_prefix})
    skipped = sorted(p for p in ec.prefixes if p >= seq)
    if skipped:  # e.g. the default sweep on short sequences: said, not silently dropped
        print(f"note: eval.prefixes {skipped} leave no token to score in sequences of {seq}: skipped", flush=True)
    dense = _dense_models(run, device)
    top_k = [(k, t) for k in sorted({k for k in ec.top_k if 1 <= k <= mixture.num_experts})
             for t in ec.top_k_temperatures]
    by_label = getattr(mixture.routers, "needs_labels", False)  # the oracle routes by domain label
    tally = MixtureTally(mixture.num_experts, prefixes, main_prefix, list(dense), top_k,
                         len(data.domain_names) if data.has_domains else 0, ec.score_all_experts)
    for start in range(0, len(ids), ec.batch_size):
        rows = ids[start:start + ec.batch_size]
        tokens = data.batch(rows)
        scores = {p: score_split(mixture.routers, data, rows, p) if by_label else mixture.routers.score(tokens[:, :p])
                  for p in prefixes}
        expert_nll = {}
        for e, need in enumerate(tally.needed(scores)):
            expert_nll[e] = np.full((len(rows), seq - 1), np.nan)
            batch_nll(mixture.expert(e), tokens, need, device, expert_nll[e])
        dense_nll = {}
        for kind, model in dense.items():
            dense_nll[kind] = np.empty((len(rows), seq - 1))
            batch_nll(model, tokens, np.arange(len(rows)), device, dense_nll[kind])
        tally.add_batch(scores, expert_nll, dense_nll, data.seq_domains[rows] if data.has_domains else None)
    results = {
        "split": ec.split, "final": final, "sequences": len(ids), "seq_len": seq, "experts": mixture.num_experts,
        "method": mixture.manifest["method"], "routing_prefix": mixture.prefix, "main_prefix": main_prefix,
        "sweep": tally.sweep(), "per_expert": tally.per_expert(),
        "per_domain": tally.per_domain(data.domain_names) if data.has_domains else [],
        "flops": _flops(run, mixture, main_prefix, seq, trained_here),
        "timing": None if by_label else _timing(mixture, data, main_prefix),
        "top_k": tally.top_k_table(),
        "tokens_per_param": {"experts": [s["tokens_per_param"] for s in run.expert_summaries()],
                             **{k: run.dense_summary(k)["tokens_per_param"] for k in dense}} if trained_here else None,
        "epochs": {"experts": [epochs(s) for s in run.expert_summaries()],
                   **{k: epochs(run.dense_summary(k)) for k in dense}} if trained_here else None,
    }
    for row in results["sweep"]:  # routers trained on M tokens: scoring more is outside what they learned
        row["extrapolated"] = row["prefix"] > mixture.prefix
    if mixture.manifest.get("refined"):  # routed by routers refined from the experts (experts/refine.py)
        refined = read_json(manifest_of(run.routers_refined))
        results["refine"] = {**refined["refine"], "heldout": refined["heldout"]}
    if ec.score_all_experts:
        results["expert_x_domain"] = tally.expert_x_domain(data.domain_names)
    if data_dir != run.data:
        results["data"] = str(data_dir)
    write_json(run.results_file(out_dir or run.eval), results)
    write_text(run.results_table(out_dir or run.eval), format_results(results) + "\n")
    return results


def epochs(summary: dict) -> float:
    """Passes a training job made over its data: sequences read / distinct sequences it could read (an
    expert's share, or the whole train split for dense). Above 1, the model saw its data repeated."""
    return summary["steps"] * summary["global_batch"] / summary["distinct_sequences"]


def _same_tokenizer(run: RunLayout, data_dir: Path) -> Path:
    """Token ids mean nothing across tokenizers: refuse data prepared with another one."""
    manifest = manifest_of(data_dir)
    if not manifest.is_file():
        raise SmalltalkError(f"no prepared data at {data_dir} (no {manifest.name})",
                             fix="prepare it with `smalltalk data prepare --run RUN --out DIR` (the run's tokenizer)")
    theirs = read_json(manifest)["tokenizer_sha256"]
    ours = sha256_file(TokenizerFiles(run.root / run.mixture()["tokenizer"]).tokenizer_json)
    if theirs != ours:
        raise SmalltalkError(f"{manifest}: data was tokenized with another tokenizer than the run's "
                             f"({theirs[:12]} vs {ours[:12]})",
                             fix="prepare the data with the run's tokenizer: `smalltalk data prepare --run RUN "
                                 "--set data.inputs=[...] --out DIR`")
    return data_dir


def _flops(run: RunLayout, mixture: SmallTalkMixture, prefix: int, seq_len: int, trained_here: bool) -> dict:
    """Training FLOPs (from the run's training records) and inference FLOPs per sequence of seq_len; a
    mixture directory without training records gets the inference part only."""
    expert_spec = spec_from_hf(mixture.expert(0).config)
    out = {}
    for acc in ACCOUNTINGS:
        if not trained_here:
            out[acc] = {"inference": inference_flops(run, expert_spec, prefix, seq_len, acc)}
            continue
        experts = sum(s["training_flops"][acc] for s in run.expert_summaries())
        overhead, trunk = routing_overhead_flops(run, acc), start_flops(run, acc)
        dense = {k: run.dense_summary(k)["training_flops"][acc] for k in DENSE_KINDS if run.dense_summary(k)}
        whole = trunk + experts + overhead["total"]  # matched-trunk continues the trunk: its FLOPs spent once
        targets = {"matched": whole, "matched-trunk": experts + overhead["total"], "matched-experts": trunk + experts,
                   "inference": whole, "bigger": whole}
        out[acc] = {"trunk_training": trunk, "experts_training": experts, "routing_overhead": overhead,
                    "mixture_training": trunk + experts + overhead["total"],
                    "training_overhead": overhead["total"] / experts, "dense_training": dense,
                    # each dense model's FLOPs over the budget it was matched to (1 up to a step's rounding)
                    "dense_budget_ratio": {k: v / targets[k] for k, v in dense.items()},
                    "inference": inference_flops(run, expert_spec, prefix, seq_len, acc)}
        for kind in dense:
            spec = spec_from_hf(AutoConfig.from_pretrained(str(TrainFiles(run.dense_kind(kind)).model)))
            out[acc]["inference"][f"dense_{kind}"] = forward_flops(spec, seq_len, 1, acc)
    return out


DENSE_LABELS = {"matched": "dense matched in full", "matched-trunk": "dense from the trunk",
                "matched-experts": "dense matched to experts only", "inference": "dense matched at inference",
                "bigger": "dense matched to top-k inference"}


def format_results(results: dict) -> str:
    """The printed table: perplexity per prefix, mixture vs dense, plus FLOPs."""
    kinds = [k for k in DENSE_KINDS if f"dense_{k}_all" in results["sweep"][0]]
    head = "| " + " | ".join(["M̂", "mixture (all)", "mixture (after M̂)"] + [
        f"{DENSE_LABELS[k]} (all) | (after M̂) | ratio after" for k in kinds]) + " |"
    lines = [f"{results['split']} split, {results['sequences']} sequences" + (
        " (the final evaluation)" if results.get("final") else ""), head, "|" + "---|" * (3 + 3 * len(kinds))]
    for row in results["sweep"]:
        mark = " (extrapolated: routers trained on M = " + str(results["routing_prefix"]) + ")" \
            if row.get("extrapolated") else ""
        cells = [f"{row['prefix']}{mark}", f"{row['mixture_all']['ppl']:.2f}", f"{row['mixture_after']['ppl']:.2f}"]
        for k in kinds:
            cells += [f"{row[f'dense_{k}_all']['ppl']:.2f}", f"{row[f'dense_{k}_after']['ppl']:.2f}",
                      f"{row['mixture_after']['ppl'] / row[f'dense_{k}_after']['ppl']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if results.get("top_k"):
        lines.append("")
        lines.append("top-k ensembles at M̂ = " + str(results["main_prefix"]) + " (ppl after M̂): " + ", ".join(
            f"k={r['k']} T={r['temperature']:g}: {r['after']['ppl']:.2f}" for r in results["top_k"]))
    flops = results["flops"]["exact"]
    lines.append("")
    if "experts_training" in flops:  # a run (a bare mixture directory has no training records)
        trunk = f"trunk {flops['trunk_training']:.3e} + " if flops.get("trunk_training") else ""
        lines.append(f"training FLOPs (exact): {trunk}experts {flops['experts_training']:.3e} + routing "
                     f"{flops['routing_overhead']['total']:.3e} ({flops['training_overhead']:.1%}); dense "
                     + ", ".join(f"{k} {v:.3e}" for k, v in flops["dense_training"].items()))
    if results.get("epochs"):
        ep = results["epochs"]
        lines.append("epochs over their data: experts " + ", ".join(f"{e:.2f}" for e in ep["experts"]) + "; "
                     + ", ".join(f"{k} {v:.2f}" for k, v in ep.items() if k != "experts"))
    heldout = results.get("refine", {}).get("heldout")
    if heldout:
        lines.append(f"routers refined from the experts: agreement with the experts' own choice "
                     f"{heldout['agreement_before']:.1%} -> {heldout['agreement_after']:.1%}, ppl "
                     f"{heldout['ppl_before']:.2f} -> {heldout['ppl_after']:.2f} (experts' choice "
                     f"{heldout['ppl_experts_choice']:.2f}; {heldout['sequences']} validation sequences)")
    inf = flops["inference"]
    timing = results.get("timing")
    lines.append(f"inference FLOPs/sequence: expert {inf['expert']:.3e} + routing {inf['routing']:.3e} "
                 f"({inf['overhead']:.1%} of the expert, {inf['routing'] / inf['total']:.1%} of the mixture)" + (
                     f"; measured routing {timing['routing_ms']:.2f} ms vs expert forward "
                     f"{timing['expert_forward_ms']:.2f} ms" if timing else ""))
    dense_inf = {k: inf[f"dense_{k}"] for k in kinds if f"dense_{k}" in inf}
    if dense_inf:
        lines.append("dense inference FLOPs/sequence ÷ the mixture's: " + ", ".join(
            f"{DENSE_LABELS[k]} {v / inf['total']:.3f}" for k, v in dense_inf.items()))
    lines.extend(_top_k_vs_bigger(results, kinds))
    return "\n".join(lines)



def _top_k_vs_bigger(results: dict, kinds: list[str]) -> list[str]:
    """c-BTM's protocol: each top-k mixture against the dense model matched to the top-k inference cost."""
    inf = results["flops"]["exact"]["inference"]
    if "bigger" not in kinds or not results.get("top_k") or "dense_bigger" not in inf:
        return []
    main = next(r for r in results["sweep"] if r["prefix"] == results["main_prefix"])
    dense = main["dense_bigger_after"]["ppl"]
    k_matched = round((inf["dense_bigger"] - inf["routing"]) / inf["expert"])
    return [f"top-k vs {DENSE_LABELS['bigger']} ({dense:.2f}, k = {k_matched}): " + ", ".join(
        f"k={r['k']} T={r['temperature']:g} {r['after']['ppl'] / dense:.3f} at "
        f"{(inf['routing'] + r['k'] * inf['expert']) / inf['dense_bigger']:.2f}x its inference FLOPs"
        for r in results["top_k"])]
