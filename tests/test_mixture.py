"""Experts, dense baselines, the mixture, evaluation, report and `smalltalk run`, end to end on tiny models."""

import json
import math

import numpy as np
import pytest

from smalltalk.config import load_config
from smalltalk.data.shards import SplitData
from smalltalk.flops_report import paper_router_overhead
from smalltalk.layout import RunLayout
from smalltalk.mixture import SmallTalkMixture
from smalltalk.routing.routers import load_routers

from .conftest import TINY_CONFIG, cli

pytestmark = pytest.mark.slow


def test_experts_read_only_their_share(pipeline_run):
    run = RunLayout(pipeline_run[0])
    shares = [np.load(run.partition / f"expert_{k:02d}.npy") for k in range(3)]
    for k, share in enumerate(shares):
        consumed = np.load(run.expert(k) / "consumed_ids.npy")
        assert len(consumed) > 0 and np.isin(consumed, share).all()
        others = np.concatenate([s for j, s in enumerate(shares) if j != k])
        assert not np.isin(consumed, others).any()


def test_mixture_routes_like_argmax_of_router_scores(pipeline_run):
    run = pipeline_run[0]
    mixture = SmallTalkMixture.from_pretrained(run)
    tokens = SplitData(run / "data", "test").batch(np.arange(20))
    chosen, scores = mixture.route(tokens, 16)
    reference = load_routers(run / "routers").score(tokens[:, :16])
    assert np.array_equal(scores, reference) and np.array_equal(chosen, reference.argmax(axis=1))
    out = mixture.generate("xyz_ {} = 1", max_new_tokens=5, do_sample=False)
    assert out["expert"] in range(3) and len(out["scores"]) == 3 and isinstance(out["text"], str)


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


def test_dense_matches_experts_tokens_and_bigger_matches_flops(pipeline_run):
    run = RunLayout(pipeline_run[0])
    experts = [json.loads((run.expert(k) / "train_manifest.json").read_text()) for k in range(3)]
    matched = json.loads((run.dense / "matched" / "train_manifest.json").read_text())
    assert matched["tokens"] == sum(e["tokens"] for e in experts)
    assert matched["params"] == experts[0]["params"]
    bigger = json.loads((run.dense / "bigger" / "train_manifest.json").read_text())
    assert 1.5 <= bigger["non_embedding_params"] / experts[0]["non_embedding_params"] <= 6
    results = json.loads((run.eval / "results.json").read_text())
    flops = results["flops"]["exact"]
    assert bigger["training_flops"]["exact"] == pytest.approx(flops["mixture_training"], rel=0.1)


def test_report_and_resumable_run(pipeline_run, capsys):
    run, args = pipeline_run
    for name in ("report.md", "index.html", "loss_curves.png", "ppl_vs_prefix.png", "em_curve.png",
                 "expert_loads.png", "domain_expert_heatmap.png", "per_domain_ppl.png"):
        assert (run / "report" / name).is_file(), name
    capsys.readouterr()
    assert cli(*args) == 0
    out = capsys.readouterr().out
    assert out.count("done, skipped") == 8
    assert cli(*args, "--set", "train.lr=0.5") == 2
    assert "different config" in capsys.readouterr().err


def test_report_mixture_curve_weights_experts_by_share(pipeline_run):
    from smalltalk.report import _curves, mixture_curve

    run = RunLayout(pipeline_run[0])
    curves = _curves(run)
    counts = json.loads((run.partition / "manifest.json").read_text())["counts"]
    mixture = mixture_curve(run, curves, routing_flops=1e9)
    experts = [{r["step"]: r for r in curves[f"expert {k:02d}"]} for k in range(3)]
    assert mixture and [r["step"] for r in mixture] == sorted(experts[0])
    for row in mixture:
        at_step = [e[row["step"]] for e in experts]
        assert row["flops"] == pytest.approx(1e9 + sum(r["flops"] for r in at_step))
        expected = sum(c * r["loss"] for c, r in zip(counts, at_step, strict=True)) / sum(counts)
        assert row["loss"] == pytest.approx(expected)


def test_dense_match_batch_variant(pipeline_run, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(pipeline_run[0], run, ignore=shutil.ignore_patterns("dense"))
    assert cli("dense", "train", "--config", TINY_CONFIG, "--run", run, "--match", "batch", "--kind", "matched") == 0
    manifest = json.loads((run / "dense" / "matched" / "train_manifest.json").read_text())
    cfg = load_config(TINY_CONFIG)
    assert manifest["steps"] == cfg.train.steps and manifest["global_batch"] == 3 * cfg.train.micro_batch_size


def test_paper_table3_router_overhead():
    # 335M x 4: routers 128k steps at batch 32 on S=1024, experts 256k steps at batch 128, prefix 256.
    assert paper_router_overhead(4, 128_000, 32, 1024, 256, 256_000, 128) / 1e19 == pytest.approx(0.22, abs=0.005)
    assert paper_router_overhead(32, 128_000, 32, 1024, 256, 512_000, 128) / 1e19 == pytest.approx(18.94, abs=0.01)


def test_export_loads_in_a_fresh_process_with_the_same_logits(pipeline_run, tmp_path):
    import subprocess
    import sys

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = pipeline_run[0]
    out = tmp_path / "export"
    assert cli("export", "--run", run, "--out", out) == 0
    assert "Evaluation" in (out / "README.md").read_text()
    AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    tokens = SplitData(run / "data", "test").batch(np.arange(4))
    np.save(tmp_path / "tokens.npy", tokens)
    script = (
        "import sys, numpy as np, torch\n"
        "from smalltalk.mixture import SmallTalkMixture\n"
        f"m = SmallTalkMixture.from_pretrained({str(out)!r})\n"
        f"x = np.load({str(tmp_path / 'tokens.npy')!r})\n"
        "nll, chosen = m.score(x, 16)\n"
        f"torch.save({{'nll': nll, 'chosen': chosen}}, {str(tmp_path / 'fresh.pt')!r})\n")
    shutil_run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert shutil_run.returncode == 0, shutil_run.stderr
    fresh = torch.load(tmp_path / "fresh.pt", weights_only=False)
    nll, chosen = SmallTalkMixture.from_pretrained(run).score(tokens, 16)
    assert np.array_equal(fresh["chosen"], chosen) and torch.equal(fresh["nll"], nll)
    for k in range(3):
        a = AutoModelForCausalLM.from_pretrained(str(out / "experts" / f"{k:02d}" / "model"))
        b = AutoModelForCausalLM.from_pretrained(str(run / "experts" / f"{k:02d}" / "model"))
        x = torch.from_numpy(tokens)
        with torch.no_grad():
            assert torch.equal(a(x).logits, b(x).logits)


def test_generate_prints_the_routing_decision(pipeline_run, capsys):
    assert cli("generate", "--run", pipeline_run[0], "xyz_ {} = 1", "--max-new-tokens", "5",
               "--temperature", "0") == 0
    captured = capsys.readouterr()
    assert "expert 0" in captured.err and "router margin" in captured.err


def test_top_k_ensemble_with_k1_is_the_routed_mixture(pipeline_run):
    results = json.loads((pipeline_run[0] / "eval" / "results.json").read_text())
    main = next(r for r in results["sweep"] if r["prefix"] == results["main_prefix"])
    top1 = [r for r in results["top_k"] if r["k"] == 1]
    assert top1 and all(r["after"]["ppl"] == pytest.approx(main["mixture_after"]["ppl"], rel=1e-9) for r in top1)
    assert {r["k"] for r in results["top_k"]} == {1, 2, 3}  # k=4 is dropped with E=3
    for r in results["top_k"]:
        assert r["after"]["tokens"] == main["mixture_after"]["tokens"]
