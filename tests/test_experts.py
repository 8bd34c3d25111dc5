"""Expert and dense-baseline jobs (experts.py): each expert reads only its share; dense is matched."""

from __future__ import annotations

import json

import numpy as np
import pytest

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


def test_dense_match_batch_variant(pipeline_run, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(pipeline_run[0], run, ignore=shutil.ignore_patterns("dense"))
    assert cli("dense", "train", "--config", TINY_CONFIG, "--run", run, "--match", "batch", "--kind", "matched") == 0
    manifest = json.loads((run / "dense" / "matched" / "train_manifest.json").read_text())
    cfg = load_config(TINY_CONFIG)
    assert manifest["steps"] == cfg.train.steps and manifest["global_batch"] == 3 * cfg.train.micro_batch_size
