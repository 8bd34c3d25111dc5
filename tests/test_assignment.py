"""Balanced assignment: exact capacities, every id once, determinism, the paper's Figure 1, brute force."""

import numpy as np
import pytest

from smalltalk.routing.assignment import argmax_assignment, balanced_assignment, capacities


def greedy_loop(scores: np.ndarray, first: int = 0) -> list[int]:
    """The paper's rule written plainly and from the rule alone (nothing of the code under test): places
    N // E each, the N mod E extra ones to experts first, first+1, ... (mod E); visit sequences by
    descending best score, ties by lower index; each takes its best expert with room, ties by lower index."""
    n, experts = len(scores), len(scores[0])
    rows = [[float(v) for v in row] for row in scores]
    room = [n // experts + (1 if (e - first) % experts < n % experts else 0) for e in range(experts)]
    assignment = [-1] * n
    for i in sorted(range(n), key=lambda i: (-max(rows[i]), i)):
        best = max((e for e in range(experts) if room[e] > 0), key=lambda e: (rows[i][e], -e))
        room[best] -= 1
        assignment[i] = best
    return assignment


@pytest.mark.parametrize("n,experts", [(100, 4), (103, 4), (7, 3), (5, 8), (1, 1), (64, 32)])
def test_capacity_exact_and_every_id_once(n, experts):
    scores = np.random.default_rng(n).normal(size=(n, experts)).astype(np.float32)
    assignment = balanced_assignment(scores)
    assert assignment.shape == (n,) and assignment.min() >= 0 and assignment.max() < experts
    loads = np.bincount(assignment, minlength=experts)
    expected = [n // experts + (1 if e < n % experts else 0) for e in range(experts)]
    assert loads.tolist() == expected == capacities(n, experts).tolist()


def test_first_experts_by_index_take_the_remainder():
    scores = np.zeros((10, 4), dtype=np.float32)  # all ties: capacity decides
    assert np.bincount(balanced_assignment(scores)).tolist() == [3, 3, 2, 2]


@pytest.mark.parametrize("first,loads", [(0, [3, 3, 2, 2]), (1, [2, 3, 3, 2]), (3, [3, 2, 2, 3]),
                                         (6, [2, 2, 3, 3])])
def test_the_remainder_rotates_with_first(first, loads):
    """Partition passes first = chunk index mod E, so over E chunks every expert gets the extra places
    equally often: the loads are exactly the rotated capacities, and the assignment is the greedy loop's."""
    scores = np.zeros((10, 4), dtype=np.float32)
    assert np.bincount(balanced_assignment(scores, first=first), minlength=4).tolist() == loads
    assert capacities(10, 4, first).tolist() == loads
    rng = np.random.default_rng(first)
    for _ in range(50):
        n, experts = int(rng.integers(1, 30)), int(rng.integers(2, 7))
        scores = rng.integers(-2, 2, size=(n, experts)).astype(np.float32)
        assert balanced_assignment(scores, first=first).tolist() == greedy_loop(scores, first)
    over_chunks = sum(np.bincount(balanced_assignment(np.zeros((10, 4)), first=c), minlength=4) for c in range(4))
    assert over_chunks.tolist() == [10, 10, 10, 10]


def test_deterministic():
    scores = np.random.default_rng(0).integers(0, 3, size=(500, 6)).astype(np.float32)  # many ties
    first = balanced_assignment(scores)
    assert all(np.array_equal(first, balanced_assignment(scores.copy())) for _ in range(3))


def test_paper_figure1_sorted_order_does_not_starve_best_fit():
    # Both sequences prefer expert 0 (capacity 1 each). Visiting in input order, the weak-fitting
    # sequence 0 would take expert 0 and starve sequence 1, whose best fit is far better there.
    scores = np.array([[-5.0, -6.0], [-1.0, -9.0]], dtype=np.float32)
    input_order = []
    room = [1, 1]
    for row in scores:
        e = next(k for k in np.argsort(-row, kind="stable") if room[k])
        room[e] -= 1
        input_order.append(e)
    assert input_order == [0, 1]
    assert balanced_assignment(scores).tolist() == [1, 0]
    assert argmax_assignment(scores).tolist() == [0, 0]


def test_agrees_with_plain_greedy_loop_on_random_cases():
    rng = np.random.default_rng(1)
    for case in range(400):
        n, experts = int(rng.integers(1, 40)), int(rng.integers(1, 8))
        if case % 2:
            scores = rng.integers(-2, 2, size=(n, experts)).astype(np.float32)  # ties everywhere
        else:
            scores = (rng.normal(size=(n, experts)) - rng.uniform(0, 3) * np.arange(experts)).astype(np.float32)
        assert balanced_assignment(scores).tolist() == greedy_loop(scores), case


def test_argmax_breaks_ties_by_lowest_index():
    assert argmax_assignment(np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]])).tolist() == [0, 1]


def test_non_finite_scores_are_refused_naming_router_and_sequence():
    from smalltalk.errors import SmalltalkError
    from smalltalk.routing.assignment import check_finite

    scores = np.zeros((4, 2), dtype=np.float32)
    scores[2, 1] = np.nan
    with pytest.raises(SmalltalkError, match="router 1 .* sequence 42"):
        check_finite(scores, np.array([7, 8, 42, 9]))
    scores[2, 1] = -np.inf
    with pytest.raises(SmalltalkError, match="non-finite"):
        balanced_assignment(scores)
