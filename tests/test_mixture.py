"""SmallTalkMixture (mixture.py) and `smalltalk generate`: route by argmax of router scores, run one expert."""

from __future__ import annotations

import numpy as np
import pytest

from smalltalk.data.shards import SplitData
from smalltalk.mixture import SmallTalkMixture
from smalltalk.routing.routers import load_routers

from .conftest import cli

pytestmark = pytest.mark.slow


def test_mixture_routes_like_argmax_of_router_scores(pipeline_run):
    run = pipeline_run[0]
    mixture = SmallTalkMixture.from_pretrained(run)
    tokens = SplitData(run / "data", "test").batch(np.arange(20))
    chosen, scores = mixture.route(tokens, 16)
    reference = load_routers(run / "routers").score(tokens[:, :16])
    assert np.array_equal(scores, reference) and np.array_equal(chosen, reference.argmax(axis=1))
    out = mixture.generate("xyz_ {} = 1", max_new_tokens=5, do_sample=False)
    assert out["expert"] in range(3) and len(out["scores"]) == 3 and isinstance(out["text"], str)


def test_generate_prints_the_routing_decision(pipeline_run, capsys):
    assert cli("generate", "--run", pipeline_run[0], "xyz_ {} = 1", "--max-new-tokens", "5",
               "--temperature", "0") == 0
    captured = capsys.readouterr()
    assert "expert 0" in captured.err and "router margin" in captured.err
