"""`smalltalk report` (evaluation/report.py): every figure, and the mixture's training curve."""

from __future__ import annotations

import json

import pytest

from smalltalk.layout import RunLayout

pytestmark = pytest.mark.slow


def test_report_has_every_figure(pipeline_run):
    run = pipeline_run[0]
    for name in ("report.md", "index.html", "loss_curves.png", "ppl_vs_prefix.png", "em_curve.png",
                 "expert_loads.png", "domain_expert_heatmap.png", "per_domain_ppl.png"):
        assert (run / "report" / name).is_file(), name
    assert "![loss_curves.png](loss_curves.png)" in (run / "report" / "report.md").read_text()


def test_report_mixture_curve_weights_experts_by_share(pipeline_run):
    from smalltalk.evaluation.report import mixture_curve, training_curves

    run = RunLayout(pipeline_run[0])
    curves = training_curves(run)
    counts = json.loads((run.partition / "manifest.json").read_text())["counts"]
    mixture = mixture_curve(run, curves, routing_flops=1e9)
    experts = [{r["step"]: r for r in curves[f"expert {k:02d}"]} for k in range(3)]
    assert mixture and [r["step"] for r in mixture] == sorted(experts[0])
    for row in mixture:
        at_step = [e[row["step"]] for e in experts]
        assert row["flops"] == pytest.approx(1e9 + sum(r["flops"] for r in at_step))
        expected = sum(c * r["loss"] for c, r in zip(counts, at_step, strict=True)) / sum(counts)
        assert row["loss"] == pytest.approx(expected)


def test_only_the_dense_model_continued_from_the_trunk_starts_at_the_trunks_flops():
    """Every dense kind but `matched-trunk` trains from scratch (issue #40): drawn from the trunk's FLOPs on,
    the loss plot credited the baseline a user would train with compute it never had (the bug before)."""
    from smalltalk.evaluation.report import flops_before
    from smalltalk.layout import DENSE_KINDS

    assert flops_before("dense matched-trunk", 7e12) == 7e12
    for kind in set(DENSE_KINDS) - {"matched-trunk"}:
        assert flops_before(f"dense {kind}", 7e12) == 0.0, kind
    assert flops_before("trunk", 7e12) == flops_before("expert 00", 7e12) == 0.0


def test_the_em_plot_of_count_based_routers_has_no_empty_loss_panel(tmp_path):
    """n-gram routers log NMI per round, no prefix loss: one panel, drawn without matplotlib's empty-legend
    warning (the bug before: an empty second panel and a UserWarning in every n-gram run's report)."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from smalltalk.evaluation.report import _plot_em
    from smalltalk.fsutil import write_json
    from smalltalk.layout import RouterFiles

    run = RunLayout(tmp_path / "run")
    run.routers.mkdir(parents=True)
    write_json(RouterFiles(run.routers).em_history,
               {"rounds": [{"round": r, "share_nmi": 0.1 * r, "heldout_nmi": 0.1 * r} for r in range(3)]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        files = _plot_em(run, tmp_path, plt)
    assert files and (tmp_path / files[0]).is_file()
