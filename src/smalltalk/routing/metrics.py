"""How well a split matches domain labels: NMI, purity and the per-expert domain mix."""

from __future__ import annotations

import numpy as np


def purity(assignment: np.ndarray, labels: np.ndarray) -> float:
    """Share of sequences whose expert's majority domain is their own domain."""
    mask = labels >= 0
    if not mask.any():
        return float("nan")
    a, y = assignment[mask], labels[mask]
    table = np.zeros((a.max() + 1, y.max() + 1), dtype=np.int64)
    np.add.at(table, (a, y), 1)
    return float(table.max(axis=1).sum() / mask.sum())


def nmi(assignment: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import normalized_mutual_info_score

    mask = labels >= 0
    if not mask.any():
        return float("nan")
    return float(normalized_mutual_info_score(labels[mask], assignment[mask]))


def domain_mix(assignment: np.ndarray, labels: np.ndarray, experts: int, names: list[str]) -> list[dict]:
    """Per expert: sequence count per domain name (labelled sequences only)."""
    mix = []
    for e in range(experts):
        mine = labels[(assignment == e) & (labels >= 0)]
        counts = np.bincount(mine, minlength=len(names)) if mine.size else np.zeros(len(names), int)
        mix.append({names[d]: int(c) for d, c in enumerate(counts) if c})
    return mix


def split_quality(assignment: np.ndarray, labels: np.ndarray) -> dict:
    return {"nmi": nmi(assignment, labels), "purity": purity(assignment, labels)}


def contingency(assignment: np.ndarray, labels: np.ndarray, experts: int, domains: int) -> np.ndarray:
    """[E, D] counts of labelled sequences per (expert, domain): additive over chunks, so a split's quality
    can be computed from running sums without holding its assignment."""
    mask = labels >= 0
    table = np.zeros((experts, domains), dtype=np.int64)
    np.add.at(table, (assignment[mask], labels[mask]), 1)
    return table


def quality_from_table(table: np.ndarray) -> dict:
    """NMI (arithmetic normalisation, as sklearn's default) and purity of a contingency table."""
    table = np.asarray(table, dtype=np.float64)
    total = table.sum()
    if total == 0:
        return {"nmi": float("nan"), "purity": float("nan")}
    p = table / total
    pa, py = p.sum(axis=1), p.sum(axis=0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(pa, py)[nz])).sum())
    entropy = [float(-(q[q > 0] * np.log(q[q > 0])).sum()) for q in (pa, py)]
    if (pa > 0).sum() == (py > 0).sum() == 1:
        nmi_value = 1.0
    else:
        nmi_value = max(mi, 0.0) / max(float(np.mean(entropy)), np.finfo(np.float64).eps)
    return {"nmi": nmi_value, "purity": float(table.max(axis=1).sum() / total)}


def mix_from_table(table: np.ndarray, names: list[str]) -> list[dict]:
    """The per-expert domain mix (as `domain_mix`) from a contingency table."""
    return [{names[d]: int(c) for d, c in enumerate(row) if c} for row in np.asarray(table)]
