"""The corpus10 grids' own machinery (benchmarks/studies): the rules that turn committed rows into a decision,
the order a grid runs in, and the loop that resumes a killed grid. The docs quote these decisions, so the
rules are checked on rows whose answer is known by hand."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "studies"))

import corpus10_runs  # noqa: E402
import proportions_corpus10 as proportions  # noqa: E402
import regime_corpus10 as regime  # noqa: E402

from smalltalk.config import load_config  # noqa: E402


def _regime_row(point: str, ratio: float, seed: int, row: str = "oracle-E4") -> dict:
    steps = regime.POINTS[point][1]
    return {"point": point, "row": row, "seed": seed, "split": "validation", "ratio": ratio, "mixture_ppl": 20.0,
            "tokens_per_param": steps / 5, "epochs": steps / 540, "training_flops": steps * 1e9}


def test_the_regime_rule_picks_the_cheapest_point_within_the_seed_spread_of_the_best():
    rows = [_regime_row("p160", 0.90, 0), _regime_row("p160", 0.92, 1),  # mean 0.91, sd 0.014
            _regime_row("p320", 0.80, 0), _regime_row("p320", 0.81, 1),  # the best, sd 0.007
            _regime_row("p640", 0.81, 0), _regime_row("p640", 0.805, 1),  # tied, dearer
            _regime_row("p50", 1.30, 0), _regime_row("p50", 1.28, 1)]
    [line] = regime.regime(regime._groups(rows))
    assert "best p320 (0.805 ± 0.007)" in line and "chosen p320" in line, line
    assert "wins from 160 tokens/param (p160)" in line and "provisional" not in line, line
    rows[0]["ratio"], rows[1]["ratio"] = 0.70, 0.92  # p160's spread now covers the best: the cheaper point ties
    [line] = regime.regime(regime._groups(rows))
    assert "chosen p160" in line, line


def test_the_regime_rule_says_provisional_and_no_win_when_it_is_so():
    rows = [_regime_row("p50", 1.3, 0, "em-E4"), _regime_row("p100", 1.01, 0, "em-E4")]
    [line] = regime.regime(regime._groups(rows))
    assert "wins from no point" in line and "provisional: fewer than 2 seeds" in line, line
    assert "chosen p100" in line, line


def test_the_regime_grid_runs_its_backbone_first_and_cheap_points_first():
    jobs = regime.plan(["p320", "p50"], [0, 1], ["em-E4", "oracle-E4"])
    assert jobs[:4] == [("p50", "oracle-E4", 0), ("p320", "oracle-E4", 0), ("p50", "em-E4", 0),
                        ("p320", "em-E4", 0)]
    assert all(seed == 1 for _, _, seed in jobs[4:])


def _proportions_row(experts: int, row: str, seed: int, full: float, share: float) -> dict:
    return {"experts": experts, "row": row, "seed": seed, "split": "validation", "ratio_full": full,
            "ratio_inference": full + 0.05, "ratio_experts_only": None, "routing_training_share": share / 20,
            "routing_inference_share": share}


def test_the_proportions_rule_takes_the_cheapest_routing_tied_with_the_best_at_every_e():
    rows = [_proportions_row(4, "default", s, r, 0.40) for s, r in enumerate((0.80, 0.81, 0.82))]
    rows += [_proportions_row(4, "ngram-2", s, r, 0.02) for s, r in enumerate((0.805, 0.815, 0.825))]
    rows += [_proportions_row(4, "router-0.01m", s, r, 0.15) for s, r in enumerate((0.90, 0.91, 0.92))]
    text = proportions.table(rows)
    assert "tied within the seed spread: default, ngram-2\n" in text + "\n", text
    assert "- chosen: ngram-2 (2.00% of the mixture's inference FLOPs)" in text, text
    assert "÷ dense matched in full 0.815 (≤ 0.85: met)" in text, text
    assert "routing / inference FLOPs 2.00% (≤ 10%: met)" in text, text
    assert "÷ dense matched at inference 0.865 (beaten)" in text
    rows += [_proportions_row(8, "default", s, r, 0.6) for s, r in enumerate((0.70, 0.70, 0.71))]
    rows += [_proportions_row(8, "ngram-2", s, r, 0.02) for s, r in enumerate((0.80, 0.80, 0.80))]
    assert "chosen: default" in proportions.table(rows)  # ngram-2 loses at E = 8: not tied at every E


def test_the_proportions_rule_says_when_no_routing_ties_at_every_e_and_marks_few_seeds():
    rows = [_proportions_row(4, "default", 0, 0.80, 0.4), _proportions_row(4, "ngram-2", 0, 0.90, 0.02),
            _proportions_row(8, "default", 0, 0.80, 0.4), _proportions_row(8, "ngram-2", 0, 0.70, 0.02)]
    text = proportions.table(rows)
    assert "no row ties with the best at every E: the choice depends on E" in text, text
    assert "fewer than 3 seeds, provisional" in text
    rows = [{**r, "steps": 800} for r in rows]
    assert proportions.table(rows).startswith("the variant of 800 steps per expert; ")


def test_the_paper_row_alone_decides_nothing():
    text = proportions.table([_proportions_row(4, "paper", 0, 0.854, 0.29)])
    assert "- no row of the routing candidates (default, router-0.01m, ngram-2, ngram-1) yet" in text, text
    assert "no row ties" not in text


def test_the_test_split_is_tabled_without_a_decision():
    rows = [{**_proportions_row(4, "default", 0, 0.8, 0.4), "split": "test"}]
    text = proportions.table(rows)
    assert "chosen" not in text and "evaluated once: no choice is made from it" in text


def _dense(run: Path, steps: int) -> None:
    (run / "dense" / "matched").mkdir(parents=True)
    (run / "dense" / "matched" / "train_manifest.json").write_text(json.dumps({"steps": steps}))


def test_a_copied_dense_model_that_is_not_the_runs_match_is_refused(tmp_path):
    run, twin = tmp_path / "run", tmp_path / "twin"
    _dense(run, 100)
    _dense(twin, 100)
    matched = {"flops": {"exact": {"dense_budget_ratio": {"matched": 1.0004}}}}
    corpus10_runs.check_copied_dense(matched, run, twin / "dense" / "matched")
    with pytest.raises(SystemExit, match="1.0300x this run's training FLOPs"):
        corpus10_runs.check_copied_dense({"flops": {"exact": {"dense_budget_ratio": {"matched": 1.03}}}}, run,
                                         twin / "dense" / "matched")
    (twin / "dense" / "matched" / "train_manifest.json").write_text(json.dumps({"steps": 120}))
    with pytest.raises(SystemExit, match="100 steps, the copy 120"):
        corpus10_runs.check_copied_dense(matched, run, twin / "dense" / "matched")
    shutil.rmtree(twin)  # the twin's row written and its directory deleted: the budget alone decides
    corpus10_runs.check_copied_dense(matched, run, twin / "dense" / "matched")
    with pytest.raises(SystemExit, match="the copy's source deleted"):
        corpus10_runs.check_copied_dense({"flops": {"exact": {"dense_budget_ratio": {"matched": 1.03}}}}, run,
                                         twin / "dense" / "matched")


def test_a_killed_processs_claim_is_taken_over_and_a_live_ones_is_not(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".claims").mkdir()
    (tmp_path / ".claims" / "a").write_text(str(dead.pid))
    (tmp_path / ".claims" / "b").write_text(str(os.getppid()))
    assert corpus10_runs.claim(tmp_path, "a") and (tmp_path / ".claims" / "a").read_text() == str(os.getpid())
    assert not corpus10_runs.claim(tmp_path, "b") and corpus10_runs.claimed_by_other(tmp_path, "b")


def test_a_grid_resumes_skipping_its_committed_rows_and_reports_a_failed_job(tmp_path):
    ran: list[tuple] = []

    def run_one(root: Path, name: str, seed: int) -> dict | None:
        ran.append((name, seed))
        return None if name == "broken" else {"name": name, "seed": seed}

    path = tmp_path / "rows.json"
    args = (tmp_path, path, lambda name, seed: f"{name}-s{seed}", run_one, lambda r: (r["name"], r["seed"]),
            lambda rows: f"{len(rows)} rows")
    assert corpus10_runs.work_through([("a", 0), ("b", 0)], *args) == 0
    assert corpus10_runs.work_through([("a", 0), ("b", 0), ("broken", 0), ("c", 1)], *args) == 1
    assert ran == [("a", 0), ("b", 0), ("broken", 0), ("c", 1)]  # a and b ran once: the second call skipped them
    assert [(r["name"], r["seed"]) for r in json.loads(path.read_text())["rows"]] == [("a", 0), ("b", 0), ("c", 1)]
    assert not any((tmp_path / ".claims").iterdir())  # every claim released, the failed job's too


def test_a_row_is_written_even_when_this_version_cannot_print_the_table(tmp_path):
    """Processes of two code versions share a grid's file: one whose table does not know a row name another
    added must still write its own row (before, the table raised inside the lock and the row was lost)."""
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"rows": [{"name": "from-a-newer-version", "seed": 0}]}))

    def table(rows: list[dict]) -> str:
        known = ["a"]
        return "\n".join(str(known.index(r["name"])) for r in rows)  # ValueError on the newer row

    assert corpus10_runs.work_through([("a", 0)], tmp_path, path, lambda name, seed: f"{name}-s{seed}",
                                      lambda root, name, seed: {"name": name, "seed": seed},
                                      lambda r: (r["name"], r["seed"]), table) == 0
    assert [r["name"] for r in json.loads(path.read_text())["rows"]] == ["from-a-newer-version", "a"]


def test_every_grid_row_pins_its_routing_so_a_change_of_the_configs_default_leaves_it_alone():
    """The rows name a routing ("default" is the configs' routing of the day they started): when the rule moves the
    configs' default, a row's config, and so its runs' digests, must not move with it."""
    config = Path(__file__).resolve().parents[1] / "configs" / "corpus10.yaml"
    rows = [*proportions.ROWS.values(), *(routing for _, routing, _ in regime.ROWS.values())]
    for method in ("em", "ngram"):
        moved = [f"routing.method={method}", "routing.init_split=random", "routing.router.preset=cpu-router-0.01m",
                 "routing.ngram_order=1"]
        for overrides in rows:
            assert load_config(config, [*moved, *overrides]).routing == load_config(config, overrides).routing, \
                overrides
