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
    assert "experts 31.02e19 + routing 0.22e19" in capsys.readouterr().out
    assert main(["plan", "--config", str(root / "paper-1.3b.yaml")]) == 0
    assert "experts 1770.65e19 + routing 18.94e19" in capsys.readouterr().out
