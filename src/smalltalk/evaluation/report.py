"""`smalltalk report RUN`: matplotlib PNGs, report.md and index.html from a run's manifests."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from smalltalk.fsutil import atomic_dir, read_json, read_jsonl
from smalltalk.layout import DENSE_KINDS, REPORT_PLOTS, RouterFiles, RunLayout, TrainFiles, manifest_of


def _rows(path: Path) -> list[dict]:
    return read_jsonl(path) if path.is_file() else []


def training_curves(run: RunLayout) -> dict[str, list[dict]]:
    curves = {}
    trained = [("expert", d) for d in sorted(run.experts_dir.glob("*"))]
    trained += [("dense", run.dense_kind(k)) for k in sorted(DENSE_KINDS)]
    for kind, directory in trained:
        metrics = TrainFiles(directory).metrics
        if metrics.is_file():
            curves[f"{kind} {directory.name}"] = [r for r in _rows(metrics) if "loss" in r]
    if TrainFiles(run.trunk).metrics.is_file():  # experts.init=trunk: what every expert branched from
        curves["trunk"] = [r for r in _rows(TrainFiles(run.trunk).metrics) if "loss" in r]
    return curves


def mixture_curve(run: RunLayout, curves: dict[str, list[dict]], routing_flops: float = 0.0) -> list[dict]:
    """The mixture's training curve, as the paper plots it against dense: at each step logged by every
    expert, loss = the experts' losses weighted by their share of the partition (the training loss over
    the union of the shares), tokens and FLOPs = the sum over experts, FLOPs + the routing overhead."""
    experts = [rows for name, rows in curves.items() if name.startswith("expert")]
    if not experts or not manifest_of(run.partition).is_file():
        return []
    counts = np.array(run.partition_manifest()["counts"], dtype=np.float64)
    if len(counts) != len(experts):  # an expert has not logged yet: no mixture point is complete
        return []
    by_step = [{r["step"]: r for r in rows} for rows in experts]
    steps = sorted(set.intersection(*(set(rows) for rows in by_step)))
    weights = counts / counts.sum()
    return [{"step": step, "loss": float(sum(w * rows[step]["loss"] for w, rows in zip(weights, by_step, strict=True))),
             "tokens": sum(rows[step]["tokens"] for rows in by_step),
             "flops": routing_flops + sum(rows[step]["flops"] for rows in by_step)} for step in steps]


def flops_before(curve: str, trunk_flops: float) -> float:
    """FLOPs a training curve's model had cost before its first step: the trunk's for a model that continues
    from it, none for a model trained from scratch, so that every curve stands at its total on the FLOPs axis."""
    return trunk_flops if curve == "dense matched-trunk" else 0.0


def _plot_loss(run: RunLayout, out: Path, plt, results: dict | None) -> list[str]:
    curves = training_curves(run)
    if not curves:
        return []
    routing = results["flops"]["exact"]["routing_overhead"]["total"] if results else 0.0
    trunk = results["flops"]["exact"].get("trunk_training", 0.0) if results else 0.0  # spent before branching
    mixture = mixture_curve(run, curves, routing + trunk)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for name, rows in curves.items():
        style = "-" if name.startswith("dense") else "--"
        start = flops_before(name, trunk)
        axes[0].plot([r["tokens"] for r in rows], [r["loss"] for r in rows], style, label=name, alpha=0.8)
        axes[1].plot([start + r["flops"] for r in rows], [r["loss"] for r in rows], style, label=name, alpha=0.8)
    if mixture:
        label = "mixture (all experts" + (" + routing)" if routing else ")")
        for ax, key in zip(axes, ["tokens", "flops"], strict=True):
            ax.plot([r[key] for r in mixture], [r["loss"] for r in mixture], "k-", lw=2, label=label)
    for ax, xlabel in zip(axes, ["training tokens", "training FLOPs (exact)"], strict=True):
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("train loss")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / REPORT_PLOTS["loss"], dpi=110)
    plt.close(fig)
    return [REPORT_PLOTS["loss"]]


def _plot_prefix(results: dict, out: Path, plt) -> list[str]:
    sweep = results["sweep"]
    x = [r["prefix"] for r in sweep]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [r["mixture_all"]["ppl"] for r in sweep], "o-", label="mixture (all tokens)")
    ax.plot(x, [r["mixture_after"]["ppl"] for r in sweep], "o--", label="mixture (after prefix)")
    for kind in DENSE_KINDS:
        if f"dense_{kind}_all" in sweep[0]:
            ax.plot(x, [r[f"dense_{kind}_after"]["ppl"] for r in sweep], "s:", label=f"dense {kind} (after prefix)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("routing prefix M̂ (tokens)")
    ax.set_ylabel(f"{results['split']} perplexity")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / REPORT_PLOTS["prefix"], dpi=110)
    plt.close(fig)
    return [REPORT_PLOTS["prefix"]]


def _plot_partition(run: RunLayout, out: Path, plt) -> list[str]:
    manifest = run.partition_manifest()
    files = []
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(range(len(manifest["counts"])), manifest["counts"], label="balanced (partition)")
    ax.plot(range(len(manifest["counts"])), manifest["score_stats"]["argmax_loads"], "ko", label="argmax")
    ax.set_xlabel("expert")
    ax.set_ylabel("training sequences")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / REPORT_PLOTS["loads"], dpi=110)
    plt.close(fig)
    files.append(REPORT_PLOTS["loads"])
    mix = manifest.get("domain_mix")
    if mix:
        domains = sorted({d for m in mix for d in m})
        table = np.array([[m.get(d, 0) for m in mix] for d in domains], dtype=float)
        table /= np.maximum(table.sum(axis=1, keepdims=True), 1)
        fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(mix), 0.5 + 0.35 * len(domains)))
        im = ax.imshow(table, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_yticks(range(len(domains)), domains, fontsize=8)
        ax.set_xticks(range(len(mix)))
        ax.set_xlabel("expert")
        fig.colorbar(im, ax=ax, label="share of the domain's sequences")
        fig.tight_layout()
        fig.savefig(out / REPORT_PLOTS["domains_x_experts"], dpi=110)
        plt.close(fig)
        files.append(REPORT_PLOTS["domains_x_experts"])
    return files


def _plot_em(run: RunLayout, out: Path, plt) -> list[str]:
    path = RouterFiles(run.routers).em_history
    if not path.is_file():
        return []
    rounds = read_json(path)["rounds"]
    losses = "heldout_routed_loss" in rounds[0]  # router LMs; count-based routers log NMI only
    fig, axes = plt.subplots(1, 2 if losses else 1, figsize=(11 if losses else 5.5, 3.5), squeeze=False)
    axes = axes[0]
    r = [row["round"] for row in rounds]
    for key in ("share_nmi", "heldout_nmi"):
        if key in rounds[0]:
            axes[0].plot(r, [row[key] for row in rounds], "o-", label=key)
    axes[0].set_xlabel("EM round")
    axes[0].set_ylabel("NMI vs domains")
    axes[0].legend(fontsize=8)
    if losses:
        axes[1].plot(r, [row["heldout_routed_loss"] for row in rounds], "o-", label="held-out, best router")
        axes[1].plot(r, [float(np.mean(row["heldout_loss"])) for row in rounds], "o--", label="held-out, mean router")
        axes[1].set_xlabel("EM round")
        axes[1].set_ylabel("prefix loss (nats/token)")
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / REPORT_PLOTS["em"], dpi=110)
    plt.close(fig)
    return [REPORT_PLOTS["em"]]


def _plot_domains(results: dict, out: Path, plt) -> list[str]:
    rows = results.get("per_domain") or []
    if not rows:
        return []
    names = [r["group"] for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(1.5 + 0.7 * len(rows), 3.5))
    ax.bar(x - 0.2, [r["mixture_after"] for r in rows], 0.4, label="mixture")
    if "dense_matched_after" in rows[0]:
        ax.bar(x + 0.2, [r["dense_matched_after"] for r in rows], 0.4, label="dense (matched in full)")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"perplexity after {results['main_prefix']} tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / REPORT_PLOTS["per_domain"], dpi=110)
    plt.close(fig)
    return [REPORT_PLOTS["per_domain"]]


def _flops_table(results: dict) -> list[str]:
    lines = ["| accounting | trunk | experts training | routing overhead | overhead | dense matched in full "
             "| inference overhead |",
             "|---|---|---|---|---|---|---|"]
    for acc, f in results["flops"].items():
        lines.append(f"| {acc} | {f.get('trunk_training', 0.0):.3e} | {f['experts_training']:.3e} | "
                     f"{f['routing_overhead']['total']:.3e} | "
                     f"{f['training_overhead']:.2%} | {f['dense_training'].get('matched', float('nan')):.3e} | "
                     f"{f['inference']['overhead']:.2%} |")
    return lines


def write_report(run: RunLayout) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from smalltalk.evaluation.eval_stage import format_results

    with atomic_dir(run.report) as out:  # report.md is the stage's done-marker: all or nothing
        _write_report(run, out, plt, format_results)
    return run.report_md


def _write_report(run: RunLayout, out: Path, plt, format_results) -> None:
    results_path = run.results_file(run.eval)
    results = read_json(results_path) if results_path.is_file() else None
    images = _plot_loss(run, out, plt, results) + _plot_em(run, out, plt)
    if manifest_of(run.partition).is_file():
        images += _plot_partition(run, out, plt)
    md = [f"# SmallTalk run report: {run.root.name}", ""]
    if results:
        images += _plot_prefix(results, out, plt) + _plot_domains(results, out, plt)
        tpp = results["tokens_per_param"]
        md += [f"## Perplexity ({results['split']} split)", "", format_results(results), "",
               f"Tokens per parameter: experts {', '.join(f'{t:.0f}' for t in tpp['experts'])}; "
               + ", ".join(f"dense {k} {v:.0f}" for k, v in tpp.items() if k != "experts"), "",
               "## FLOPs", "", *_flops_table(results), ""]
    md += ["## Figures", ""] + [f"![{name}]({name})" for name in images]
    (out / run.report_md.name).write_text("\n".join(md) + "\n")
    body = "\n".join(f"<h3>{html.escape(n)}</h3><img src='{n}' style='max-width:100%'>" for n in images)
    table = html.escape("\n".join(md[:md.index("## Figures")]))
    title = html.escape(run.root.name)
    (out / run.report_html.name).write_text(f"<html><head><meta charset='utf-8'><title>{title}</title>"
                                            f"</head><body><pre>{table}</pre>{body}</body></html>\n")
