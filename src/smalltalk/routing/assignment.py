"""Balanced assignment (the paper's greedy rule) and plain argmax routing.

Rule: capacity N // E per expert, N mod E experts (from `first` on, by index) one more; visit sequences by
descending max_e score (ties: lower sequence index first), give each its highest-scoring expert that
still has room (ties: lower expert index).

The greedy pass is sequential by nature; we compute the same result with vectorised fixed-point rounds.
Let T_e be the sort position at which expert e fills up (N at first). Each sequence takes its best
expert among those with T_e > its position; then each T_e is recomputed as one past the position of
e's cap_e-th taker. The T_e only decrease and their fixed point is exactly the sequential greedy result
(checked against a plain loop, written independently, in tests/test_assignment.py); it needs at most E rounds.
"""

from __future__ import annotations

import numpy as np

from smalltalk.errors import SmalltalkError


def capacities(n: int, experts: int, first: int = 0) -> np.ndarray:
    """N // E each; the N mod E extra places go to experts first, first+1, ... (mod E). Partition rotates
    `first` with the chunk index so that over many chunks no expert is systematically favoured."""
    caps = np.full(experts, n // experts, dtype=np.int64)
    caps[(first + np.arange(n % experts)) % experts] += 1
    return caps


def argmax_assignment(scores: np.ndarray) -> np.ndarray:
    """Inference routing: each sequence to its highest-scoring expert (lowest index on ties), by the rule the
    exported Hugging Face model runs (hub/modeling_smalltalk.choose_experts): one rule, never two."""
    import torch

    from smalltalk.hub.modeling_smalltalk import choose_experts

    return choose_experts(torch.from_numpy(np.asarray(scores, dtype=np.float64)))[0][:, 0].numpy()


def greedy_order(scores: np.ndarray) -> np.ndarray:
    """Sequence indices by descending best score; stable, so ties keep the lower index first."""
    return np.argsort(-scores.max(axis=1), kind="stable")


def check_finite(scores: np.ndarray, ids: np.ndarray | None = None) -> None:
    """Refuse NaN/inf scores (a diverged router): assignment would silently misplace those sequences."""
    bad = ~np.isfinite(scores)
    if bad.any():
        row, expert = (int(x[0]) for x in np.nonzero(bad))
        sequence = int(ids[row]) if ids is not None else row
        raise SmalltalkError(f"router {expert} gave a non-finite score ({scores[row, expert]}) to sequence {sequence}"
                             f" ({int(bad.any(axis=1).sum())} sequences affected)",
                             fix=f"router {expert} has diverged: retrain the routers (lower routing.train.lr)")


def balanced_assignment(scores: np.ndarray, first: int = 0) -> np.ndarray:
    """[N] expert index per sequence, loads equal to capacities(N, E, first); scores must be finite."""
    scores = np.asarray(scores, dtype=np.float32)
    check_finite(scores)
    n, experts = scores.shape
    caps = capacities(n, experts, first)
    order = greedy_order(scores)
    ordered = scores[order]  # row k is the k-th visited sequence
    fill = np.full(experts, n, dtype=np.int64)  # an expert is open to positions < fill[e]
    masked = np.empty_like(ordered)
    rows = np.arange(n)
    while True:
        np.copyto(masked, ordered)
        masked[rows[:, None] >= fill[None, :]] = -np.inf
        choice = masked.argmax(axis=1)
        new_fill = _fill_positions(choice, caps, n)
        if np.array_equal(new_fill, fill):
            break
        fill = new_fill
    assignment = np.empty(n, dtype=np.int64)
    assignment[order] = choice
    return assignment


def _fill_positions(choice: np.ndarray, caps: np.ndarray, n: int) -> np.ndarray:
    """First position at which each expert is closed: just after its cap-th taker (n: never full)."""
    experts = len(caps)
    by_expert = np.argsort(choice, kind="stable")  # positions grouped by expert, ascending in each group
    counts = np.bincount(choice, minlength=experts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    fill = np.full(experts, n, dtype=np.int64)
    full = (counts >= caps) & (caps > 0)
    fill[full] = by_expert[starts[full] + caps[full] - 1] + 1
    fill[caps == 0] = 0
    return fill
