"""Router refinement from the experts (experts/refine.py, issue #27 item 5): relabel training sequences by
the expert with the lowest loss, fine-tune the routers on them, route the mixture with them, and count
the cost in the routing budget the dense baseline is matched to."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from smalltalk.errors import SmalltalkError
from smalltalk.experts.refine import expert_nll
from smalltalk.layout import RunLayout
from smalltalk.mixture.model import SmallTalkMixture

from .conftest import TINY_CONFIG, cli

UNTIL_EXPERTS = ("tokenizer", "data", "routers", "partition", "experts")


def _fork_until_experts(source, target):
    """A copy of a finished run with only its stages up to the experts (what a refined run shares)."""
    for name in ("tokenizer", "data", "routers", "partition", "experts", "mixture.json"):
        copy = shutil.copytree if (source / name).is_dir() else shutil.copy2
        copy(source / name, target / name)
    stages = json.loads((source / "stages.json").read_text())
    (target / "stages.json").write_text(json.dumps({k: v for k, v in stages.items() if k in UNTIL_EXPERTS}))


@pytest.fixture(scope="module")
def refined_run(pipeline_run, tmp_path_factory):
    source, args = pipeline_run
    run = tmp_path_factory.mktemp("refined") / "run"
    run.mkdir()
    _fork_until_experts(source, run)
    args = [a if a != source else run for a in args]
    assert cli(*args, "--set", "refine.sequences=96") == 0
    return run


def test_refined_routers_serve_the_mixture_and_agree_with_the_experts_choice(refined_run):
    mixture = json.loads((refined_run / "mixture.json").read_text())
    refined = json.loads((refined_run / "routers-refined" / "manifest.json").read_text())
    assert mixture["routers"] == "routers-refined" and mixture["refined"] is True
    assert mixture["partition_routers_sha256"] == refined["refined_from"] != mixture["routers_sha256"]
    assert sum(refined["refine"]["labelled"]) == 96 and sum(refined["refine"]["steps"]) > 0
    labels = np.load(refined_run / "routers-refined" / "labels.npz")
    from smalltalk.data.shards import SplitData

    data = SplitData(refined_run / "data", "train")
    experts = [refined_run / rel for rel in mixture["expert_dirs"]]
    assert np.array_equal(expert_nll(experts, data, labels["ids"], "cpu").argmin(axis=1), labels["labels"])
    heldout = refined["heldout"]
    for when in ("before", "after"):
        assert 0 <= heldout[f"agreement_{when}"] <= 1 and heldout[f"ppl_{when}"] >= heldout["ppl_experts_choice"]
    routed = SmallTalkMixture.from_pretrained(refined_run)  # routes with the refined routers, checksum checked
    assert routed.routers.models[0].config is not None
    results = json.loads((refined_run / "eval" / "results.json").read_text())
    assert results["refine"]["heldout"] == heldout


def test_refinement_is_routing_cost_in_the_dense_budget(refined_run, pipeline_run):
    """Labelling (every expert over every sampled sequence) and fine-tuning count in the routing FLOPs, and
    the dense model matched in full gets them: it trains more steps than the unrefined run's."""
    results = json.loads((refined_run / "eval" / "results.json").read_text())
    base = json.loads((pipeline_run[0] / "eval" / "results.json").read_text())
    refined = json.loads((refined_run / "routers-refined" / "manifest.json").read_text())
    for accounting in ("exact", "paper"):
        overhead = results["flops"][accounting]["routing_overhead"]
        assert overhead["refinement"] == refined["flops"][accounting]["total"] > 0
        assert overhead["total"] == pytest.approx(base["flops"][accounting]["routing_overhead"]["total"]
                                                  + overhead["refinement"])
    steps = [json.loads((run / "dense" / "matched" / "train_manifest.json").read_text())["steps"]
             for run in (refined_run, pipeline_run[0])]
    assert steps[0] > steps[1]


def test_refined_routers_replaced_are_refused(refined_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(refined_run, run, ignore=shutil.ignore_patterns("checkpoints", "report", "dense"))
    weights = run / "routers-refined" / "00" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(SmalltalkError, match="not the ones"):
        SmallTalkMixture.from_pretrained(run)
    assert RunLayout(run).mixture()["routers"] == "routers-refined"


def test_an_export_of_a_refined_run_routes_as_the_run_does(refined_run, tmp_path):
    """Was: export and SFT copied RUN/routers whatever mixture.json named, so the copy routed by the
    unrefined routers (and failed its checksum)."""
    assert cli("export", "--run", refined_run, "--out", tmp_path / "export", "--format", "smalltalk") == 0
    exported = SmallTalkMixture.from_pretrained(tmp_path / "export")
    original = SmallTalkMixture.from_pretrained(refined_run)
    tokens = np.random.default_rng(0).integers(0, 300, size=(16, 12))
    assert np.array_equal(exported.routers.score(tokens), original.routers.score(tokens))


def test_refinement_needs_router_lms(capsys):
    assert cli("run", "--set", "routing.method=tfidf", "--set", "refine.sequences=8") == 2
    assert "fine-tunes router LMs" in capsys.readouterr().err
    assert cli("run", "--set", "refine.passes=0") == 2


@pytest.fixture(scope="module")
def weak_routers_refined(corpus_file, tmp_path_factory):
    """A run whose EM routers barely trained (2 steps a round at a low learning rate): they disagree with the
    experts' own choice on many sequences, which refinement (160 relabelled sequences, 3 passes) can fix."""
    run = tmp_path_factory.mktemp("weak") / "run"
    assert cli("run", "--config", TINY_CONFIG, "--run", run, "--set", f"data.inputs=[{corpus_file}]", "--set",
               "data.max_docs=null", "--set", "routing.chunk=240", "--set", "routing.experts=3", "--set",
               "routing.train.steps=2", "--set", "routing.train.lr=3e-4", "--set", "refine.sequences=160",
               "--set", "refine.passes=3", "--set", "dense.bigger=false", "--set", "dense.inference=false",
               "--set", "dense.experts_only=false", "--set", "sft.enabled=false") == 0
    return run


def test_refinement_judged_by_plain_hf_forwards_moves_routing_toward_the_experts_choice(weak_routers_refined):
    """Judged without our scoring code: every validation sequence's NLL under each expert from HF's own forward
    (log_softmax, gather), each router's prefix log-likelihood from HF (conftest.hf_prefix_loglik). Where the
    routers disagreed with the experts' own choice (the lowest NLL), refinement must agree more often and
    route to a lower perplexity than the routers it started from."""
    import torch
    from transformers import AutoModelForCausalLM

    from smalltalk.data.shards import SplitData

    from .conftest import hf_prefix_loglik, router_model_dirs

    refined_run = weak_routers_refined
    mixture = json.loads((refined_run / "mixture.json").read_text())
    val = SplitData(refined_run / "data", "validation")
    tokens = torch.from_numpy(val.batch(np.arange(len(val)))).long()
    nll = []
    for rel in mixture["expert_dirs"]:
        model = AutoModelForCausalLM.from_pretrained(str(refined_run / rel)).eval()
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=tokens).logits.double(), -1)
        nll.append(-logp[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1).sum(-1))
    nll = torch.stack(nll, dim=1).numpy()  # [N, E]
    best = nll.argmin(axis=1)
    prefix = mixture["prefix"]
    choice = {name: hf_prefix_loglik(router_model_dirs(refined_run / name), tokens[:, :prefix]).argmax(axis=1)
              for name in ("routers", "routers-refined")}
    agreement = {name: float((c == best).mean()) for name, c in choice.items()}
    ppl = {name: float(np.exp(nll[np.arange(len(c)), c].sum() / (len(c) * (tokens.shape[1] - 1))))
           for name, c in choice.items()}
    assert agreement["routers"] < 1, "no disagreement to refine: the test would prove nothing"
    assert agreement["routers-refined"] > agreement["routers"], agreement
    assert ppl["routers-refined"] < ppl["routers"], ppl
