"""SmallTalk at its own proportions: n-gram routers (routing/ngram.py), inference-matched dense sizing
(experts/dense.py) and the commands that may read the test split only with --final."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter

import numpy as np
import pytest

from smalltalk.data.shards import SplitData
from smalltalk.experts.dense import spec_for_forward_flops
from smalltalk.flops import forward_flops
from smalltalk.llama import PRESETS
from smalltalk.routing.ngram import NgramRouters, table_sizes
from smalltalk.routing.routers import load_routers, score_split

from .conftest import ROUTING, cli


def _reference_loglik(rows: list[list[int]], scored: list[int], order: int, prior: float, vocab: int) -> float:
    """log p(scored) under a Dirichlet-smoothed n-gram LM counted from `rows` with dicts: no tables, no hashing."""
    pairs, contexts, unigrams = Counter(), Counter(), Counter()
    pad = [vocab] * (order - 1)
    for row in rows:
        padded = pad + row
        for s in range(1, len(row)):
            context = tuple(padded[s:s + order - 1])
            pairs[context, row[s]] += 1
            contexts[context] += 1
            unigrams[row[s]] += 1
    total = sum(unigrams.values()) + vocab
    out, padded = 0.0, pad + scored
    for s in range(1, len(scored)):
        context = tuple(padded[s:s + order - 1])
        p_unigram = (unigrams[scored[s]] + 1) / total
        out += math.log((pairs[context, scored[s]] + prior * p_unigram) / (contexts[context] + prior))
    return out


@pytest.mark.parametrize("order,buckets", [(2, 1 << 20), (3, 1 << 20), (3, 1 << 16)])
def test_ngram_scores_equal_a_dict_counted_reference(order, buckets):
    """Direct tables equal the reference to float rounding; hashed ones (buckets below V^order) differ only by
    collisions, which add counts: close, never the same code path."""
    rng = np.random.default_rng(0)
    vocab = 50
    rows = rng.integers(0, vocab, size=(40, 12))
    routers = NgramRouters.empty(2, vocab, order, 8.0, buckets)
    routers.count(0, rows[:20])
    routers.count(1, rows[20:])
    scored = rng.integers(0, vocab, size=(5, 12))
    got = routers.score(scored)
    for e, share in enumerate((rows[:20], rows[20:])):
        want = [_reference_loglik(share.tolist(), row.tolist(), order, 8.0, vocab) for row in scored]
        direct = table_sizes(vocab, order, buckets)[0] == (vocab + 1) ** (order - 1) * vocab
        assert got[:, e] == pytest.approx(want, rel=1e-5 if direct else 0.01), (order, buckets, e)


@pytest.mark.parametrize("order,buckets", [(1, 1 << 20), (2, 1 << 20), (3, 1 << 20), (2, 1 << 10), (3, 1 << 12),
                                           (3, 1 << 10)])
def test_the_exported_models_ngram_routers_score_what_the_package_scores(order, buckets):
    """hub/modeling_smalltalk.py re-implements the n-gram score in torch for the Hugging Face export (direct and
    hashed tables): each row scores what routing/ngram.py scores for that row alone, a right-padded shorter
    row what its real tokens score."""
    import torch

    from smalltalk.hub.modeling_smalltalk import NgramRouters as HubNgramRouters

    rng = np.random.default_rng(order * buckets)
    vocab, experts = 60, 3
    routers = NgramRouters.empty(experts, vocab, order, 17.0, buckets)
    for e in range(experts):
        routers.count(e, rng.integers(15 * e, 15 * e + 30, size=(50, 10)))
    routers.scale(0.5)  # counts that are not integers, as EM's earlier rounds leave them
    routers.count(0, rng.integers(0, vocab, size=(7, 10)))
    hub = HubNgramRouters(experts, vocab, order, 17.0, routers.pairs.shape[1], routers.contexts.shape[1])
    for name in ("pairs", "contexts", "unigrams"):
        getattr(hub, name).copy_(torch.from_numpy(getattr(routers, name)))
    rows = rng.integers(0, vocab, size=(12, 10))
    lengths = [10] * 6 + [2, 3, 5, 7, 9, 4]
    mask = torch.tensor([[1] * n + [0] * (10 - n) for n in lengths])
    padded = torch.from_numpy(rows) * mask
    got = hub.prefix_loglik(padded, mask).numpy()
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(got[i], routers.score(rows[i:i + 1, :n])[0], rtol=1e-6)
    assert (got.argmax(axis=1)[:6] == routers.score(rows[:6]).argmax(axis=1)).all()


def test_ngram_routers_route_a_domain_to_the_router_that_counted_it():
    rng = np.random.default_rng(1)
    low, high = rng.integers(0, 20, size=(30, 16)), rng.integers(20, 40, size=(30, 16))
    routers = NgramRouters.empty(2, 40, 2, 8.0, 1 << 20)
    routers.count(0, low)
    routers.count(1, high)
    test = np.concatenate([rng.integers(0, 20, size=(10, 16)), rng.integers(20, 40, size=(10, 16))])
    assert routers.score(test).argmax(axis=1).tolist() == [0] * 10 + [1] * 10


def test_ngram_em_trains_partitions_and_is_counted_as_lookups(prepared_run, tmp_path):
    """`routers train --method ngram`: the paper's EM with count tables; loaded back it scores what it scored
    in training; the domains separate (synthetic domains of disjoint alphabets); its FLOPs are look-ups."""
    out = tmp_path / "ngram"
    assert cli("routers", "train", *ROUTING, "--run", prepared_run, "--out", out, "--method", "ngram") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "ngram" and manifest["order"] == 2
    history = json.loads((out / "em_history.json").read_text())["rounds"]
    assert len(history) == 3 and history[-1]["heldout_nmi"] > 0.8, history[-1]
    routers = load_routers(out)
    val = SplitData(prepared_run / "data", "validation")
    ids = val.sample(40)
    scores = score_split(routers, val, ids, 16)
    assert scores.shape == (40, 3) and np.isfinite(scores).all()
    from smalltalk.experts.budget import router_prefix_flops
    from smalltalk.routing.ngram import OPS_PER_TOKEN

    assert router_prefix_flops(manifest, 16) == OPS_PER_TOKEN * 15
    assert router_prefix_flops({"method": "tfidf"}, 16) == 0.0


def test_spec_for_forward_flops_hits_the_target_and_keeps_the_shape():
    expert = dataclasses.replace(PRESETS["cpu-expert-0.04m"], vocab_size=512)
    base = forward_flops(expert, 256)
    for factor in (1.01, 1.42, 1.8, 4.0):
        spec = spec_for_forward_flops(expert, factor * base, 256)
        assert spec.num_layers == expert.num_layers and spec.head_dim == expert.head_dim
        unit = 6 * 256 * spec.hidden_size * spec.num_layers * 2  # one rounding step of the MLP width
        assert abs(forward_flops(spec, 256) - factor * base) <= unit, factor
    paper = PRESETS["paper-335m"]
    spec = spec_for_forward_flops(paper, 1.013 * forward_flops(paper, 1024), 1024)
    assert spec.hidden_size == paper.hidden_size and spec.intermediate_size > paper.intermediate_size


@pytest.mark.parametrize("command", [["routers", "compare", "R", "--data", "D", "--split", "test"],
                                     ["eval", "ppl", "--model", "M", "--data", "D", "--split", "test"]])
def test_the_test_split_needs_final(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(*command)
    assert exit_info.value.code == 2
    assert "the test split is read only with --final" in capsys.readouterr().err


def test_eval_ppl_defaults_to_validation(pipeline_run, capsys):
    run = pipeline_run[0]
    assert cli("eval", "ppl", "--model", run / "experts" / "00" / "model", "--data", run / "data",
               "--max-sequences", "8") == 0
    assert json.loads(capsys.readouterr().out)["split"] == "validation"


@pytest.mark.slow
def test_a_run_routed_by_ngram_routers_costs_lookups_and_shares_its_dense_job(ngram_run):
    """`smalltalk run` with routing.method=ngram: partition, experts, eval; routing is a rounding error of
    the budget, so the inference-matched dense model is the matched one (hard links, not a second training)."""
    run = ngram_run
    results = json.loads((run / "eval" / "results.json").read_text())
    inference = results["flops"]["exact"]["inference"]
    assert 0 < inference["routing"] / inference["total"] < 1e-3
    assert results["method"] == "ngram"
    matched, same = run / "dense" / "matched" / "model", run / "dense" / "inference" / "model"
    assert (matched / "model.safetensors").stat().st_ino == (same / "model.safetensors").stat().st_ino
    row = next(r for r in results["sweep"] if r["prefix"] == 16)
    assert row["dense_inference_after"]["ppl"] == row["dense_matched_after"]["ppl"]


@pytest.mark.slow
def test_a_mixture_routed_by_ngram_routers_exports_as_one_hugging_face_model(ngram_run, tmp_path):
    """`smalltalk export` of an n-gram-routed mixture: the count tables travel as buffers of the one model; in a
    process without our package, a padded batch routes each row as SmallTalkMixture does (same expert, the
    same scores, also when loaded in bfloat16) and greedy generation gives `smalltalk generate`'s text."""
    from smalltalk.mixture.model import SmallTalkMixture

    from .test_export_hf import _child, _prompts

    out = tmp_path / "hf"
    assert cli("export", "--run", ngram_run, "--out", out) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["router_method"] == "ngram" and config["router_config"]["order"] == 2
    prompts = _prompts()
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    _child(f"""
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained({str(out)!r}, padding_side="left")
prompts = json.load(open("prompts.json"))
batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
with torch.no_grad():
    routed = model(**batch)
greedy = model.generate(**batch, max_new_tokens=8, do_sample=False)
half = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True, dtype=torch.bfloat16).eval()
with torch.no_grad():
    half_scores = half.route(batch["input_ids"], batch["attention_mask"])[2]
json.dump({{"half_tables": str(half.routers.pairs.dtype), "half_scores": half_scores.tolist(),
           "experts": routed.routed_experts[:, 0].tolist(), "scores": routed.router_scores.tolist(),
           "texts": tok.batch_decode(greedy[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)}},
          open("got.json", "w"))
""", tmp_path)
    got = json.loads((tmp_path / "got.json").read_text())
    mixture = SmallTalkMixture.from_pretrained(ngram_run)
    for i, prompt in enumerate(prompts):
        chosen, scores = mixture.route([mixture.tokenizer(prompt, add_special_tokens=False).input_ids])
        assert got["experts"][i] == int(chosen[0]), i
        np.testing.assert_allclose(got["scores"][i], scores[0], rtol=1e-6)
    assert len(set(got["experts"])) > 1, "the batch must mix experts"
    # loaded in bfloat16 the experts are bfloat16, the count tables stay float32: the same scores (they were
    # rounded counts before)
    assert got["half_tables"] == "torch.float32" and got["half_scores"] == got["scores"]
    assert got["texts"] == [mixture.generate(p, max_new_tokens=8)["text"] for p in prompts]
