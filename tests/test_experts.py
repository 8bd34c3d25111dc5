"""Expert and dense-baseline jobs (experts/dense.py): each expert reads only its share; dense is matched."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from smalltalk.config import load_config
from smalltalk.layout import RunLayout

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


def test_dense_matches_experts_tokens_and_bigger_matches_flops(pipeline_run):
    """matched-experts: the experts' tokens exactly; matched (in full): also the routing FLOPs, in tokens of
    one expert's architecture, to a step's rounding; bigger: the mixture's whole budget."""
    run = RunLayout(pipeline_run[0])
    experts = [json.loads((run.expert(k) / "train_manifest.json").read_text()) for k in range(3)]
    experts_only = json.loads((run.dense / "matched-experts" / "train_manifest.json").read_text())
    assert experts_only["tokens"] == sum(e["tokens"] for e in experts)
    matched = json.loads((run.dense / "matched" / "train_manifest.json").read_text())
    assert matched["params"] == experts_only["params"] == experts[0]["params"]
    overhead = json.loads((run.eval / "results.json").read_text())["flops"]["exact"]["routing_overhead"]["total"]
    per_token = experts_only["training_flops"]["exact"] / experts_only["tokens"]
    step = matched["global_batch"] * matched["seq_len"]
    assert abs(matched["tokens"] - experts_only["tokens"] - overhead / per_token) <= step / 2
    results = json.loads((run.eval / "results.json").read_text())
    flops, inference = results["flops"]["exact"], results["flops"]["exact"]["inference"]
    for kind, k in (("inference", 1), ("bigger", 3)):  # per sequence: routers + k experts (c-BTM's protocol)
        dense = json.loads((run.dense / kind / "train_manifest.json").read_text())
        assert dense["params"] > experts[0]["params"]
        assert inference[f"dense_{kind}"] == pytest.approx(inference["routing"] + k * inference["expert"],
                                                           rel=0.02), kind
        assert dense["training_flops"]["exact"] == pytest.approx(flops["mixture_training"], rel=0.1), kind
        assert flops["dense_budget_ratio"][kind] == pytest.approx(1, rel=0.1)


def test_dense_kinds_trained_side_by_side_equal_one_after_another(pipeline_run, tmp_path):
    """The pipeline (experts.parallel = 2) trains the dense baselines as side-by-side jobs; `dense train` in
    one process, one after another, gives every kind the same weights."""
    import shutil

    from safetensors.torch import load_file

    src = RunLayout(pipeline_run[0])
    kinds = sorted(d.name for d in src.dense.iterdir())
    assert len(kinds) >= 3 and all(src.dense_job_log(k).is_file() for k in kinds), kinds
    copy = RunLayout(tmp_path / "copy")
    shutil.copytree(src.root, copy.root, ignore=shutil.ignore_patterns("dense", "jobs"))
    assert cli("dense", "train", "--run", copy.root) == 0
    assert not copy.jobs.exists() or not any(copy.jobs.glob("dense-*.log"))
    for kind in kinds:
        a, b = (load_file(str(r.dense_kind(kind) / "model" / "model.safetensors")) for r in (src, copy))
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), kind


def test_dense_match_batch_variant(pipeline_run, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(pipeline_run[0], run, ignore=shutil.ignore_patterns("dense"))
    assert cli("dense", "train", "--config", TINY_CONFIG, "--run", run, "--match", "batch", "--kind",
               "matched-experts") == 0
    manifest = json.loads((run / "dense" / "matched-experts" / "train_manifest.json").read_text())
    cfg = load_config(TINY_CONFIG)
    assert manifest["steps"] == cfg.train.steps and manifest["global_batch"] == 3 * cfg.train.micro_batch_size


def test_expert_trains_the_same_from_its_own_data(pipeline_run, tmp_path):
    """`experts data` writes expert 0's share as prepared data of its own; on a copy of the run that holds
    no RUN/data and no RUN/partition, the expert trains to the same losses and weights."""
    import shutil

    from safetensors.torch import load_file

    src = RunLayout(pipeline_run[0])
    run = RunLayout(tmp_path / "copy")
    shutil.copytree(src.root, run.root, ignore=shutil.ignore_patterns("experts", "dense", "eval", "jobs"))
    assert cli("experts", "data", "--run", run.root, "--expert", "0") == 0
    alone = RunLayout(tmp_path / "alone")  # what another machine receives: config + its share's data
    (alone.root / "experts-data").mkdir(parents=True)
    shutil.copy(run.config_file, alone.config_file)
    shutil.copytree(run.expert_data(0), alone.expert_data(0))
    val = ["--set", "train.eval_every=10"]
    assert cli("experts", "train", "--run", alone.root, "--expert", "0", *val) == 0
    shutil.rmtree(run.expert_data(0))
    assert cli("experts", "train", "--run", run.root, "--expert", "0", *val) == 0  # RUN/data + the share's ids
    metrics = [[json.loads(x) for x in (r.expert(0) / "metrics.jsonl").read_text().splitlines()] for r in (alone, run)]
    assert [m.get("loss") for m in metrics[0]] == [m.get("loss") for m in metrics[1]]
    val_losses = [[m["val_loss"] for m in rows if "val_loss" in m] for rows in metrics]
    assert val_losses[0] and val_losses[0] == val_losses[1]
    a, b = (load_file(str(r.expert(0) / "model" / "model.safetensors")) for r in (alone, run))
    assert all(torch.equal(a[k], b[k]) for k in a)
