"""`smalltalk eval` (evaluation/eval_stage.py): perplexities on the right tokens, top-k ensembles."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from smalltalk.config import load_config
from smalltalk.data.shards import SplitData
from smalltalk.mixture.model import SmallTalkMixture

from .conftest import TINY_CONFIG, cli

pytestmark = pytest.mark.slow


def test_post_prefix_perplexity_excludes_prefix_tokens(pipeline_run):
    run = pipeline_run[0]
    results = json.loads((run / "eval" / "results.json").read_text())
    n, seq = results["sequences"], results["seq_len"]
    mixture = SmallTalkMixture.from_pretrained(run)
    assert results["split"] == "validation"  # what the pipeline's eval stage scores (test: `eval --final` only)
    data = SplitData(run / "data", results["split"])
    tokens = data.batch(data.sample(load_config(TINY_CONFIG).eval.max_sequences))
    assert len(tokens) == n
    for row in results["sweep"]:
        prefix = row["prefix"]
        assert row["mixture_all"]["tokens"] == n * (seq - 1)
        assert row["mixture_after"]["tokens"] == n * (seq - prefix)
        assert row["dense_matched_after"]["tokens"] == row["mixture_after"]["tokens"]
        nll, _ = mixture.score(tokens, prefix)
        after = nll[:, prefix - 1:].double().mean().item()  # column j predicts token j+1
        assert row["mixture_after"]["ppl"] == pytest.approx(math.exp(after), rel=1e-6)
        assert row["mixture_all"]["ppl"] == pytest.approx(math.exp(nll.double().mean().item()), rel=1e-6)


def test_top_k_ensemble_with_k1_is_the_routed_mixture(pipeline_run):
    results = json.loads((pipeline_run[0] / "eval" / "results.json").read_text())
    main = next(r for r in results["sweep"] if r["prefix"] == results["main_prefix"])
    top1 = [r for r in results["top_k"] if r["k"] == 1]
    assert top1 and all(r["after"]["ppl"] == pytest.approx(main["mixture_after"]["ppl"], rel=1e-9) for r in top1)
    assert {r["k"] for r in results["top_k"]} == {1, 2, 3}  # k=4 is dropped with E=3
    for r in results["top_k"]:
        assert r["after"]["tokens"] == main["mixture_after"]["tokens"]


def test_streaming_tables_match_whole_matrices(pipeline_run, tmp_path):
    """The batch-by-batch tally equals the whole-matrix arithmetic (every expert on every sequence), at
    any batch size, and only the experts a table uses are run."""
    import torch

    from smalltalk.training.nll import token_nll

    run = pipeline_run[0]
    assert cli("eval", "--run", run, "--out", tmp_path / "b5", "--set", "eval.batch_size=5",
               "--set", "eval.score_all_experts=true") == 0
    small = json.loads((tmp_path / "b5" / "results.json").read_text())
    big = json.loads((run / "eval" / "results.json").read_text())
    for a, b in zip(small["sweep"], big["sweep"], strict=True):
        assert a["mixture_after"]["ppl"] == pytest.approx(b["mixture_after"]["ppl"], rel=1e-6)
        assert a["dense_matched_all"]["ppl"] == pytest.approx(b["dense_matched_all"]["ppl"], rel=1e-6)
    mixture = SmallTalkMixture.from_pretrained(run)
    data = SplitData(run / "data", big["split"])
    tokens = torch.from_numpy(data.batch(data.sample(load_config(TINY_CONFIG).eval.max_sequences)))
    nll = np.stack([token_nll(mixture.expert(e), tokens).double().numpy() for e in range(mixture.num_experts)])
    main = big["main_prefix"]
    scores = mixture.routers.score(tokens[:, :main].numpy())
    top = np.argsort(-scores, axis=1, kind="stable")[:, :2]
    w = np.exp(np.take_along_axis(scores, top, axis=1).astype(np.float64))
    w /= w.sum(axis=1, keepdims=True)
    rows = np.arange(len(tokens))
    mixed = -np.log(w[:, :1] * np.exp(-nll[top[:, 0], rows]) + w[:, 1:] * np.exp(-nll[top[:, 1], rows]))
    want = math.exp(mixed[:, main - 1:].mean())
    got = next(r for r in big["top_k"] if r["k"] == 2 and r["temperature"] == 1.0)["after"]["ppl"]
    assert got == pytest.approx(want, rel=1e-6)
    by_expert = {row["expert"]: row for row in small["expert_x_domain"]}
    labels, names = data.seq_domains[data.sample(64)], data.domain_names
    for e in range(mixture.num_experts):
        for g, name in enumerate(names):
            if (labels == g).any():
                expected = math.exp(nll[e][labels == g][:, main - 1:].mean())
                assert by_expert[e][name] == pytest.approx(expected, rel=1e-6)
