"""The batching engine's sampler: the nucleus distribution, and a seeded draw that rounding cannot move."""

import numpy as np
import torch

from smalltalk.serving.batching import _Row, sample_tokens


def _rows(n: int, temperature: float, top_p: float, seed: int = 0) -> list[_Row]:
    return [_Row({"temperature": temperature, "top_p": top_p}, 0, None, None,
                 torch.Generator().manual_seed(seed + i)) for i in range(n)]


def test_samples_follow_the_nucleus_distribution():
    logits = torch.tensor([2.0, 0.5, 1.0, -1.0, 1.5, -3.0])
    probs = torch.softmax(logits / 0.7, -1)
    order = probs.argsort(descending=True)
    kept = order[:(probs[order].cumsum(0) - probs[order] < 0.9).sum()]  # the nucleus of top_p 0.9
    want = torch.zeros_like(probs)
    want[kept] = probs[kept] / probs[kept].sum()
    n = 20000
    drawn = sample_tokens(logits.expand(n, -1).clone(), _rows(n, 0.7, 0.9))
    got = np.bincount(drawn, minlength=len(logits)) / n
    assert set(drawn) == set(kept.tolist())  # nothing outside the nucleus, every token inside it
    assert np.abs(got - want.numpy()).max() < 0.015  # 3 standard errors at n = 20000
    assert sample_tokens(logits[None], _rows(1, 0.0, 0.9)) == [0]  # temperature 0: greedy


def test_a_seeded_draw_survives_rounding_that_reorders_near_ties():
    """A batch's kernels round logits differently; with near-equal probabilities that reorders them. The
    same seeds must still give the same tokens, except a draw within rounding of an interval's edge."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 512, generator=gen) * 1e-3  # a flat distribution: many near ties
    rounded = logits + torch.randn(1, 512, generator=gen) * 1e-6
    assert not torch.equal(logits.argsort(descending=True), rounded.argsort(descending=True))
    n = 2000
    a = sample_tokens(logits.expand(n, -1).clone(), _rows(n, 1.0, 0.95))
    b = sample_tokens(rounded.expand(n, -1).clone(), _rows(n, 1.0, 0.95))
    assert sum(x != y for x, y in zip(a, b, strict=True)) <= n // 200
    assert len(set(a)) > 100  # really sampled, not one token
