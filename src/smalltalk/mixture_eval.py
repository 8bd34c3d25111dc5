"""`smalltalk eval`: the mixture against the dense baselines on the test split, with FLOPs.

Every model's per-token NLL on the test sequences is computed once; each prefix length M̂ of the sweep
then only re-routes. Perplexity = exp(ΣNLL / Σtokens), reported on all tokens (the paper's way) and on
the tokens after the prefix only (the router never saw what is scored). Dense is always scored on
exactly the same tokens.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig

from smalltalk.config import Config
from smalltalk.data.shards import SplitData
from smalltalk.distributed import resolve_device
from smalltalk.errors import SmalltalkError
from smalltalk.evaluate import token_nll
from smalltalk.flops import forward_flops
from smalltalk.flops_report import ACCOUNTINGS, inference_flops, routing_overhead_flops
from smalltalk.fsutil import read_json, write_json
from smalltalk.layout import DENSE_KINDS, HF_CONFIG, RunLayout, TrainFiles, manifest_of
from smalltalk.mixture import SmallTalkMixture
from smalltalk.model import spec_from_hf
from smalltalk.routing.assignment import argmax_assignment
from smalltalk.routing.routers import score_split


def _nll_matrix(model, data: SplitData, ids: np.ndarray, batch: int, device) -> np.ndarray:
    rows = [token_nll(model, torch.from_numpy(data.batch(ids[i:i + batch])).to(device)).cpu().numpy()
            for i in range(0, len(ids), batch)]
    return np.concatenate(rows).astype(np.float64)


def _ppl(nll: np.ndarray, first: int = 1) -> dict:
    part = nll[:, first - 1:]
    return {"ppl": math.exp(part.mean()) if part.size else float("nan"), "tokens": int(part.size)}


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


def evaluate_run(cfg: Config, run: RunLayout, data_dir: Path | None = None, out_dir: Path | None = None) -> dict:
    """The mixture vs the dense baselines on `data_dir` (default RUN/data; e.g. RUN/added/NN/data after
    `experts add`), written to `out_dir`/results.json (default RUN/eval)."""
    ec = cfg.eval
    device = resolve_device(ec.device)
    mixture = SmallTalkMixture.from_pretrained(run.root, str(device))
    data_dir = _same_tokenizer(run, data_dir) if data_dir is not None else run.data
    data = SplitData(data_dir, ec.split)
    ids, seq = data.sample(ec.max_sequences), data.seq_len
    n = len(ids)
    prefixes = sorted({p for p in ec.prefixes if 2 <= p < seq})
    main_prefix = ec.main_prefix or mixture.prefix
    expert_nll = [_nll_matrix(mixture.expert(k), data, ids, ec.batch_size, device) for k in range(mixture.num_experts)]
    dense = {k: _nll_matrix(m, data, ids, ec.batch_size, device) for k, m in _dense_models(run, device).items()}
    sweep, chosen_at, scores_at = [], {}, {}
    for prefix in sorted(set(prefixes) | {main_prefix}):
        scores_at[prefix] = score_split(mixture.routers, data, ids, prefix)
        chosen = argmax_assignment(scores_at[prefix])
        chosen_at[prefix] = chosen
        mix = np.stack([expert_nll[k][i] for i, k in enumerate(chosen)])
        row = {"prefix": prefix, "loads": np.bincount(chosen, minlength=mixture.num_experts).tolist(),
               "mixture_all": _ppl(mix), "mixture_after": _ppl(mix, prefix)}
        for kind, nll in dense.items():
            row[f"dense_{kind}_all"], row[f"dense_{kind}_after"] = _ppl(nll), _ppl(nll, prefix)
        sweep.append(row)
    chosen = chosen_at[main_prefix]
    mix = np.stack([expert_nll[k][i] for i, k in enumerate(chosen)])
    results = {
        "split": ec.split, "sequences": n, "seq_len": seq, "experts": mixture.num_experts,
        "method": mixture.manifest["method"], "routing_prefix": mixture.prefix, "main_prefix": main_prefix,
        "sweep": sweep, "per_expert": _per_group(chosen, chosen, mix, dense, main_prefix, mixture.num_experts),
        "per_domain": _per_domain(data, ids, chosen, mix, dense, main_prefix),
        "flops": _flops(run, mixture, main_prefix), "timing": _timing(mixture, data, main_prefix),
        "top_k": top_k_table(expert_nll, scores_at[main_prefix], main_prefix, ec.top_k, ec.top_k_temperatures),
        "tokens_per_param": {"experts": [s["tokens_per_param"] for s in run.expert_summaries()],
                             **{k: run.dense_summary(k)["tokens_per_param"] for k in dense}},
    }
    if data_dir != run.data:
        results["data"] = str(data_dir)
    write_json(run.results_file(out_dir or run.eval), results)
    return results


def _same_tokenizer(run: RunLayout, data_dir: Path) -> Path:
    """Token ids mean nothing across tokenizers: refuse data prepared with another one."""
    manifest = manifest_of(data_dir)
    if not manifest.is_file():
        raise SmalltalkError(f"no prepared data at {data_dir} (no {manifest.name})",
                             fix="prepare it with `smalltalk data prepare --run RUN --out DIR` (the run's tokenizer)")
    theirs, ours = read_json(manifest)["tokenizer_sha256"], read_json(manifest_of(run.data))["tokenizer_sha256"]
    if theirs != ours:
        raise SmalltalkError(f"{manifest}: data was tokenized with another tokenizer than the run's "
                             f"({theirs[:12]} vs {ours[:12]})",
                             fix="prepare the data with the run's tokenizer: `smalltalk data prepare --run RUN "
                                 "--set data.inputs=[...] --out DIR`")
    return data_dir


def top_k_table(expert_nll: list[np.ndarray], scores: np.ndarray, prefix: int, ks: list[int],
                temperatures: list[float]) -> list[dict]:
    """c-BTM's inference rule: mix the top-k experts' next-token probabilities with weights from the router
    posterior softmax(score / T). Uses each expert's probability of the actual next token, so no extra
    forward passes; inference cost is k expert forwards."""
    stacked = -np.stack(expert_nll)  # [E, N, S-1] log p of the target
    rows = np.arange(scores.shape[0])
    order = np.argsort(-scores, axis=1, kind="stable")
    out = []
    for k in sorted({k for k in ks if 1 <= k <= len(expert_nll)}):
        top = order[:, :k]
        for t in temperatures:
            logits = np.take_along_axis(scores, top, axis=1).astype(np.float64) / t
            log_w = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
            mixed = np.logaddexp.reduce([log_w[:, j, None] + stacked[top[:, j], rows] for j in range(k)], axis=0)
            out.append({"k": k, "temperature": t, "expert_forwards": k, "after": _ppl(-mixed, prefix),
                        "all": _ppl(-mixed)})
    return out


def _per_group(groups: np.ndarray, chosen: np.ndarray, mix: np.ndarray, dense: dict, prefix: int,
               count: int, names: list[str] | None = None) -> list[dict]:
    rows = []
    for g in range(count):
        mask = groups == g
        if not mask.any():
            continue
        row = {"group": names[g] if names else g, "sequences": int(mask.sum()),
               "mixture_after": _ppl(mix[mask], prefix)["ppl"],
               "experts_used": np.bincount(chosen[mask]).nonzero()[0].tolist()}
        for kind, nll in dense.items():
            row[f"dense_{kind}_after"] = _ppl(nll[mask], prefix)["ppl"]
        rows.append(row)
    return rows


def _per_domain(data: SplitData, ids: np.ndarray, chosen, mix, dense, prefix: int) -> list[dict]:
    if not data.has_domains:
        return []
    labels = data.seq_domains[ids]
    return _per_group(labels, chosen, mix, dense, prefix, len(data.domain_names), data.domain_names)


def _flops(run: RunLayout, mixture: SmallTalkMixture, prefix: int) -> dict:
    expert_spec = spec_from_hf(mixture.expert(0).config)
    out = {}
    for acc in ACCOUNTINGS:
        experts = sum(s["training_flops"][acc] for s in run.expert_summaries())
        overhead = routing_overhead_flops(run, acc)
        dense = {k: run.dense_summary(k)["training_flops"][acc] for k in DENSE_KINDS if run.dense_summary(k)}
        out[acc] = {"experts_training": experts, "routing_overhead": overhead,
                    "mixture_training": experts + overhead["total"],
                    "training_overhead": overhead["total"] / experts, "dense_training": dense,
                    "inference": inference_flops(run, expert_spec, prefix, acc)}
        for kind in dense:
            spec = spec_from_hf(AutoConfig.from_pretrained(str(TrainFiles(run.dense_kind(kind)).model)))
            out[acc]["inference"][f"dense_{kind}"] = forward_flops(spec, mixture_seq_len(run), 1, acc)
    return out


def mixture_seq_len(run: RunLayout) -> int:
    return SplitData(run.data, "train").seq_len


def format_results(results: dict) -> str:
    """The printed table: perplexity per prefix, mixture vs dense, plus FLOPs."""
    kinds = [k for k in ("matched", "bigger") if f"dense_{k}_all" in results["sweep"][0]]
    head = "| M̂ | mixture (all) | mixture (after M̂) | " + " | ".join(
        f"dense {k} (all) | dense {k} (after M̂) | ratio after" for k in kinds) + " |"
    lines = [head, "|" + "---|" * (3 + 3 * len(kinds))]
    for row in results["sweep"]:
        cells = [str(row["prefix"]), f"{row['mixture_all']['ppl']:.2f}", f"{row['mixture_after']['ppl']:.2f}"]
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
    lines.append(f"training FLOPs (exact): experts {flops['experts_training']:.3e} + routing "
                 f"{flops['routing_overhead']['total']:.3e} ({flops['training_overhead']:.1%}); dense "
                 + ", ".join(f"{k} {v:.3e}" for k, v in flops["dense_training"].items()))
    inf = flops["inference"]
    lines.append(f"inference FLOPs/sequence: expert {inf['expert']:.3e} + routing {inf['routing']:.3e} "
                 f"({inf['overhead']:.1%}); measured routing {results['timing']['routing_ms']:.2f} ms vs expert "
                 f"forward {results['timing']['expert_forward_ms']:.2f} ms")
    return "\n".join(lines)

