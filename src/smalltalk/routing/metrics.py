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
