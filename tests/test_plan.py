"""`smalltalk plan` (run/plan.py): per-stage disk, host memory and GPU-hours of the paper's configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from smalltalk.config import load_config
from smalltalk.run.plan import resources

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_resources_of_the_paper_335m_setting():
    cfg = load_config(CONFIGS / "paper-335m.yaml")
    rows = {r["stage"]: r for r in resources(cfg, 989e12, 0.4)}
    tokens = 4 * 256_000 * 128 * 1024  # what the four experts consume: 134B tokens
    held_out = 1 - cfg.data.validation_fraction - cfg.data.test_fraction
    assert rows["data"]["disk"] == pytest.approx(tokens * 2 / held_out)  # uint16 token files
    assert rows["partition"]["disk"] == 2 * 4 * 256_000 * 128 * 8  # int64 ids, parts and merged
    assert rows["each expert job"]["hours"] == pytest.approx(31.02e19 / 4 / (989e12 * 0.4 * 3600), rel=0.01)
    assert rows["dense (matched)"]["hours"] == pytest.approx(4 * rows["each expert job"]["hours"])
    assert rows["partition"]["memory"] < 4e9  # bounded by the chunk, not by the 131M sequences
    # routers run at the measured router efficiency, not the experts' MFU: 131M x 4 prefixes of 256 tokens
    router = 2 * 4.4e6 * 256  # ~2 x params FLOPs per token (the exact count adds attention)
    measured = 26e12  # FLOP/s of the paper's routers scoring 256-token prefixes on one H200 (gpu_check.sh)
    scoring_hours = 4 * 256_000 * 128 * 4 * router / (measured * 3600)
    assert rows["partition"]["hours"] == pytest.approx(scoring_hours, rel=0.25)
    assert "refine (optional)" not in rows  # off unless refine.sequences > 0
    refined = {r["stage"]: r for r in resources(load_config(CONFIGS / "paper-335m.yaml", ["refine.sequences=100000"]),
                                                989e12, 0.4)}
    labelling = 100_000 * 4 * 2 * 335e6 * 1024 / (989e12 * 0.4 * 3600)  # every expert over every sequence
    assert refined["refine (optional)"]["hours"] == pytest.approx(labelling, rel=0.35)


def test_plan_reproduces_paper_table3(capsys):
    from smalltalk.cli import main

    root = CONFIGS
    assert main(["plan", "--config", str(root / "paper-335m.yaml")]) == 0
    assert "experts 31.02e19 + routing 0.22e19 = 31.24e19 (routing 0.71%)" in capsys.readouterr().out
    assert main(["plan", "--config", str(root / "paper-1.3b.yaml")]) == 0
    assert "experts 1770.65e19 + routing 18.94e19" in capsys.readouterr().out


def test_routing_without_router_lms_costs_no_gpu_hours_and_its_own_flops(capsys):
    """n-gram routers: no GPU stage, the look-ups' operations counted as the run's FLOPs accounting counts
    them (experts/budget.py); tf-idf / random / oracle: no routing FLOPs at all."""
    from smalltalk.cli import main
    from smalltalk.routing.ngram import OPS_PER_TOKEN, table_sizes
    from smalltalk.run.plan import plan

    cfg = load_config(CONFIGS / "paper-335m.yaml", ["routing.method=ngram"])
    rc = cfg.routing
    rows = {r["stage"]: r for r in resources(cfg, 989e12, 0.4)}
    assert rows["routers (ngram)"]["hours"] is None and rows["partition"]["hours"] is None
    pairs, contexts = table_sizes(cfg.model.vocab_size or cfg.tokenizer.vocab_size, rc.ngram_order, rc.ngram_buckets)
    assert rows["routers (ngram)"]["disk"] == pytest.approx(4 * 4 * (pairs + contexts + 32_000), rel=0.01)
    counted = rc.rounds * rc.chunk
    scored = counted + 4 * 256_000 * 128  # every sequence EM counts and every one the experts train on
    expected = OPS_PER_TOKEN * (counted * rc.prefix + scored * 4 * (rc.prefix - 1))
    assert plan(cfg)["router_overhead_flops"] == pytest.approx(expected)
    assert main(["plan", "--config", str(CONFIGS / "paper-335m.yaml"), "--set", "routing.method=ngram"]) == 0
    out = capsys.readouterr().out
    assert "n-gram routers of order 2, 4.5 MB of tables each" in out and "(routing < 0.01%)" in out, out
    assert "routing with n-gram counts instead" not in out, out
    lm_rows = {r["stage"]: r for r in resources(load_config(CONFIGS / "paper-335m.yaml"), 989e12, 0.4)}
    assert main(["plan", "--config", str(CONFIGS / "paper-335m.yaml")]) == 0
    saved = lm_rows["routers (EM)"]["hours"] + lm_rows["partition"]["hours"]
    assert f"the {saved:,.1f} GPU-hours of routers and partition become CPU work" in capsys.readouterr().out
    oracle = load_config(CONFIGS / "paper-335m.yaml", ["routing.method=oracle"])
    assert plan(oracle)["router_overhead_flops"] == 0
    assert {r["stage"]: r for r in resources(oracle, 989e12, 0.4)}["partition"]["hours"] is None
