"""SmallTalkMixture (mixture/model.py) and `smalltalk generate`: route by argmax of router scores, run one expert."""

from __future__ import annotations

import numpy as np
import pytest

from smalltalk.data.shards import SplitData
from smalltalk.mixture.model import SmallTalkMixture

from .conftest import cli, hf_prefix_loglik, router_model_dirs

pytestmark = pytest.mark.slow


def test_mixture_routes_like_argmax_of_router_scores(pipeline_run):
    """The reference is each router's own HF log-softmax over the prefix (not our scoring code): scores to
    float rounding, and the same expert wherever the reference's winner is clear of rounding."""
    run = pipeline_run[0]
    mixture = SmallTalkMixture.from_pretrained(run)
    tokens = SplitData(run / "data", "test").batch(np.arange(20))
    chosen, scores = mixture.route(tokens, 16)
    reference = hf_prefix_loglik(router_model_dirs(run / "routers"), tokens[:, :16])
    assert np.allclose(scores, reference, rtol=1e-5, atol=1e-4)
    ranked = np.sort(reference, axis=1)
    clear = ranked[:, -1] - ranked[:, -2] > 1e-3
    assert clear.sum() >= 15 and np.array_equal(chosen[clear], reference.argmax(axis=1)[clear])
    assert len(set(chosen.tolist())) > 1, "every test sequence went to one expert: the check would be vacuous"
    out = mixture.generate("xyz_ {} = 1", max_new_tokens=5, do_sample=False)
    ids = mixture.tokenizer("xyz_ {} = 1", return_tensors="pt").input_ids
    want = mixture.expert(out["expert"]).generate(ids, max_new_tokens=5, do_sample=False,
                                                  pad_token_id=mixture.tokenizer.eos_token_id)
    assert out["expert"] == int(hf_prefix_loglik(router_model_dirs(run / "routers"), ids[:, :16]).argmax())
    assert out["text"] == mixture.tokenizer.decode(want[0, ids.shape[1]:], skip_special_tokens=True)


def test_generate_prints_the_routing_decision(pipeline_run, capsys):
    assert cli("generate", "--run", pipeline_run[0], "xyz_ {} = 1", "--max-new-tokens", "5",
               "--temperature", "0") == 0
    captured = capsys.readouterr()
    assert "expert 0" in captured.err and "router margin" in captured.err


def test_reroute_at_continues_with_the_expert_the_longer_prefix_picks(pipeline_run):
    """docs/serving.md's short prompts: `reroute_at=M` generates until prompt + text reach M tokens, routes the
    M tokens again and continues with the winner. Reference: HF routers and HF `generate` of plain Llama
    directories, leg by leg; at least one prompt must change expert, or the second leg is not exercised."""
    from transformers import AutoModelForCausalLM

    run = pipeline_run[0]
    mixture = SmallTalkMixture.from_pretrained(run)
    routers, pad = router_model_dirs(run / "routers"), mixture.tokenizer.eos_token_id
    experts = [AutoModelForCausalLM.from_pretrained(str(run / d)).eval() for d in mixture.manifest["expert_dirs"]]
    tokens = SplitData(run / "data", "validation").batch(np.arange(16))
    switched = 0
    for row in tokens:
        prompt = mixture.tokenizer.decode(row[:10])  # routed first on 2 tokens: the 16 may well disagree
        ids = mixture.tokenizer(prompt, return_tensors="pt").input_ids
        out = mixture.generate(prompt, max_new_tokens=20, prefix_len=2, reroute_at=16, do_sample=False)
        first = int(hf_prefix_loglik(routers, ids[:, :2]).argmax())
        leg = experts[first].generate(ids, max_new_tokens=16 - ids.shape[1], do_sample=False, pad_token_id=pad)
        assert leg.shape[1] == 16, "the first leg ended early: nothing to re-route"
        second = int(hf_prefix_loglik(routers, leg).argmax())
        whole = experts[second].generate(leg, max_new_tokens=20 - (16 - ids.shape[1]), do_sample=False,
                                         pad_token_id=pad)
        assert out["experts"] == [first, second]  # each routing decision, the same expert twice included
        assert out["text"] == mixture.tokenizer.decode(whole[0, ids.shape[1]:], skip_special_tokens=True)
        switched += second != first
    assert switched >= 1, "no prompt changed expert at 16 tokens: the re-routing leg was never run"
