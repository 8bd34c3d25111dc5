"""What routed post-training buys: assistant-token perplexity on held-out instructions, and routing stability.

Four models score the answers of the test examples (loss on assistant tokens only, as trained): (a) the
pre-trained mixture and (b) the SFT mixture, each example on the expert its prompt routes to; (c) the
pre-trained dense model of one expert's size and (d) its SFT. Per domain and overall. Routing stability:
the share of test examples whose prompt goes to the same expert as their answer text alone would, and
the expert x domain confusion of the prompt routing.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from smalltalk.data.tokenizer import encode_text
from smalltalk.fsutil import read_json, write_json
from smalltalk.layout import RunLayout, SFTFiles, TrainFiles
from smalltalk.mixture.model import SmallTalkMixture
from smalltalk.sft.data import IGNORE, pack_rows
from smalltalk.sft.examples import read_examples, split_files
from smalltalk.sft.job import encode_split, route, routing_ids
from smalltalk.training.nll import token_nll


@torch.inference_mode()
def answer_nll(model, tokens: np.ndarray, labels: np.ndarray, batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(summed NLL, assistant tokens) per row: the loss of training, per example."""
    device = next(model.parameters()).device
    sums, counts = np.zeros(len(tokens)), np.zeros(len(tokens))
    for start in range(0, len(tokens), batch):
        x = torch.from_numpy(tokens[start:start + batch].astype(np.int64)).to(device)
        target = torch.from_numpy(labels[start:start + batch, 1:].astype(np.int64)).to(device)
        keep = (target != IGNORE).float()
        nll = token_nll(model, x) * keep
        sums[start:start + len(x)] = nll.sum(1).cpu().numpy()
        counts[start:start + len(x)] = keep.sum(1).cpu().numpy()
    return sums, counts


def _by_expert(mixture: SmallTalkMixture, chosen: np.ndarray, tokens, labels) -> tuple[np.ndarray, np.ndarray]:
    sums, counts = np.zeros(len(tokens)), np.zeros(len(tokens))
    for k in np.unique(chosen):
        rows = np.flatnonzero(chosen == k)
        sums[rows], counts[rows] = answer_nll(mixture.expert(int(k)), tokens[rows], labels[rows])
    return sums, counts


def _load(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()


def measure_sft(run: RunLayout, sft: SFTFiles, data: Path, route_on: str, final: bool = False) -> dict:
    """Held-out answer perplexity before and after SFT, on the validation instructions (what choices such as
    sft.route_on are made on); `final`: on the test instructions, once, for the final table."""
    files = split_files(Path(data))
    split = "test" if final else "validation"
    if split not in files:
        return {"note": f"no {split} file: nothing held out to measure"}
    examples = read_examples(files[split])
    before, after = SmallTalkMixture.from_pretrained(run.root), SmallTalkMixture.from_pretrained(sft.root)
    tokenizer = after.tokenizer
    seq_len = after.expert(0).config.max_position_embeddings
    encoded, _ = encode_split(tokenizer, examples, seq_len)
    tokens, labels = pack_rows(encoded, seq_len, tokenizer.eos_token_id)
    chosen, _ = route(after, [routing_ids(tokenizer, ex, enc, route_on)
                              for ex, enc in zip(examples, encoded, strict=True)])
    by_answer, _ = route(after, [encode_text(tokenizer, ex["messages"][-1]["content"]) for ex in examples])
    scored = {"mixture": _by_expert(before, chosen, tokens, labels), "mixture_sft": _by_expert(after, chosen, tokens,
                                                                                               labels)}
    for name, model_dir in (("dense", TrainFiles(run.dense_kind("matched")).model),
                            ("dense_sft", TrainFiles(sft.job("dense")).model)):
        if model_dir.is_dir():
            scored[name] = answer_nll(_load(model_dir), tokens, labels)
    domains = [ex["domain"] or "-" for ex in examples]
    table = {}
    for domain in sorted(set(domains)) + ["all"]:
        rows = np.array([d == domain or domain == "all" for d in domains])
        table[domain] = {"examples": int(rows.sum()), **{name: math.exp(s[rows].sum() / max(c[rows].sum(), 1))
                                                         for name, (s, c) in scored.items()}}
    results = {"split": split, "route_on": route_on, "perplexity": table,
               "pretraining_perplexity": forgetting(run, sft, before, after, split=split),
               "routing_stability": float(np.mean(chosen == by_answer)),
               "confusion": {f"{k:02d}": dict(Counter(d for d, c in zip(domains, chosen, strict=True) if c == k))
                             for k in range(after.num_experts)},
               "sft": read_json(sft.examples)}
    write_json(sft.results_final if final else sft.results, results)
    return results


def forgetting(run: RunLayout, sft: SFTFiles, before: SmallTalkMixture, after: SmallTalkMixture,
               sequences: int = 256, split: str = "validation") -> dict:
    """Perplexity on a seeded sample of a pre-training split, before and after SFT (what replay is for): the
    mixtures routed on their first M tokens as in pre-training eval, the dense models alone."""
    from smalltalk.data.shards import SplitData

    data = SplitData(run.data, split)
    ids = torch.from_numpy(data.batch(data.sample(sequences)))
    out = {"sequences": len(ids)}
    for name, mixture in (("mixture", before), ("mixture_sft", after)):
        out[name] = math.exp(float(torch.cat([mixture.score(ids[i:i + 32])[0] for i in range(0, len(ids), 32)])
                                   .mean()))
    for name, model_dir in (("dense", TrainFiles(run.dense_kind("matched")).model),
                            ("dense_sft", TrainFiles(sft.job("dense")).model)):
        if model_dir.is_dir():
            model = _load(model_dir)
            with torch.inference_mode():
                out[name] = math.exp(float(torch.cat([token_nll(model, ids[i:i + 32]) for i in range(0, len(ids), 32)])
                                           .mean()))
    return out


def format_results(results: dict) -> str:
    table = results["perplexity"]
    names = [n for n in ("mixture", "mixture_sft", "dense", "dense_sft") if n in table["all"]]
    lines = [f"assistant-token perplexity on the {results['split']} instructions (routed on {results['route_on']})",
             "| domain | examples | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for domain, row in table.items():
        lines.append(f"| {domain} | {row['examples']} | " + " | ".join(f"{row[n]:.2f}" for n in names) + " |")
    lines.append(f"routing stability (routed on {results['route_on']} like on the answer alone): "
                 f"{results['routing_stability']:.1%}")
    pre = results["pretraining_perplexity"]
    lines.append(f"pre-training {results['split']} perplexity (forgetting): " + ", ".join(
        f"{n} {pre[n]:.2f}" for n in names if n in pre))
    return "\n".join(lines)
