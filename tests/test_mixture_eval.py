"""`smalltalk eval` (mixture_eval.py): perplexities on the right tokens, top-k ensembles."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from smalltalk.data.shards import SplitData
from smalltalk.mixture import SmallTalkMixture

pytestmark = pytest.mark.slow


def test_post_prefix_perplexity_excludes_prefix_tokens(pipeline_run):
    run = pipeline_run[0]
    results = json.loads((run / "eval" / "results.json").read_text())
    n, seq = results["sequences"], results["seq_len"]
    mixture = SmallTalkMixture.from_pretrained(run)
    tokens = SplitData(run / "data", "test").batch(np.arange(n))
    for row in results["sweep"]:
        prefix = row["prefix"]
        assert row["mixture_all"]["tokens"] == n * (seq - 1)
        assert row["mixture_after"]["tokens"] == n * (seq - prefix)
        assert row["dense_matched_after"]["tokens"] == row["mixture_after"]["tokens"]
        nll, _ = mixture.score(tokens, prefix)
        after = nll[:, prefix - 1:].double().mean().item()  # column j predicts token j+1
        assert row["mixture_after"]["ppl"] == pytest.approx(math.exp(after), rel=1e-4)
        assert row["mixture_all"]["ppl"] == pytest.approx(math.exp(nll.double().mean().item()), rel=1e-4)


def test_top_k_ensemble_with_k1_is_the_routed_mixture(pipeline_run):
    results = json.loads((pipeline_run[0] / "eval" / "results.json").read_text())
    main = next(r for r in results["sweep"] if r["prefix"] == results["main_prefix"])
    top1 = [r for r in results["top_k"] if r["k"] == 1]
    assert top1 and all(r["after"]["ppl"] == pytest.approx(main["mixture_after"]["ppl"], rel=1e-9) for r in top1)
    assert {r["k"] for r in results["top_k"]} == {1, 2, 3}  # k=4 is dropped with E=3
    for r in results["top_k"]:
        assert r["after"]["tokens"] == main["mixture_after"]["tokens"]
