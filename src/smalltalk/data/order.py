"""The one seeded order of a split's sequences: every chunk and every sample is a range of it.

Prepared data is in input-file order, so "the first n sequences" or "chunk j of the file" is a few domains,
not a sample of the corpus. Every consumer (EM chunks, partition chunks, held-out sets, benchmark samples)
instead takes positions [a, b) of this permutation. It is a keyed Feistel network over the next power of
four with cycle walking: position -> sequence id is computed in O(1) memory per item, so a 10^9-sequence
split needs no 8 GB id array, and any range can be produced on any machine from (n, seed) alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ROUNDS = 6  # Feistel rounds: 4 already give a pseudo-random permutation; 6 for margin
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """splitmix64's finaliser of x ^ key: the Feistel round function (uint64 arithmetic wraps)."""
    z = (x ^ key) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


class SequenceOrder:
    """A seeded permutation of range(n), evaluated on demand: `ids(a, b)` are the sequence ids at positions
    a..b-1. Same (n, seed) -> same order on every machine and numpy version (integer arithmetic only)."""

    def __init__(self, n: int, seed: int | Sequence[int]) -> None:
        self.n = int(n)
        self.seed = seed
        bits = max(2, int(self.n - 1).bit_length())
        self._half = (bits + 1) // 2
        self._mask = np.uint64((1 << self._half) - 1)
        self._keys = np.random.default_rng(seed).integers(0, 2**63, size=ROUNDS, dtype=np.uint64)

    def __len__(self) -> int:
        return self.n

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self._half)
        left, right = x >> half, x & self._mask
        for key in self._keys:
            left, right = right, left ^ (_mix(right, key) & self._mask)
        return (left << half) | right

    def ids(self, start: int, stop: int) -> np.ndarray:
        """int64 sequence ids at positions [start, stop) (clipped to n)."""
        start, stop = max(0, start), min(self.n, stop)
        if stop <= start:
            return np.zeros(0, dtype=np.int64)
        if self.n == 1:
            return np.zeros(1, dtype=np.int64)
        y = self._encrypt(np.arange(start, stop, dtype=np.uint64))
        n = np.uint64(self.n)
        outside = np.flatnonzero(y >= n)
        while outside.size:  # cycle walking: re-encrypt until inside [0, n); keeps it a bijection on [0, n)
            y[outside] = self._encrypt(y[outside])
            outside = outside[y[outside] >= n]
        return y.astype(np.int64)

    def sample(self, k: int) -> np.ndarray:
        """k sequence ids drawn without replacement (the first k positions)."""
        return self.ids(0, k)

    def num_chunks(self, size: int) -> int:
        return -(-self.n // size)

    def chunk(self, index: int, size: int) -> np.ndarray:
        return self.ids(index * size, (index + 1) * size)


class ChunkStream:
    """Chunk r of N distinct sequences of a split (a SplitData): consecutive ranges of its seeded order (a
    fresh order per epoch), never reusing a sequence while unseen ones remain in the epoch; the epoch's
    leftover (< N) is skipped. O(N) memory whatever the corpus size."""

    def __init__(self, data, size: int) -> None:
        from smalltalk.errors import SmalltalkError

        if size > len(data):
            raise SmalltalkError(f"routing.chunk={size} exceeds the {len(data)} training sequences",
                                 fix="lower routing.chunk")
        self.data, self.size = data, size
        self.per_epoch = len(data) // size

    def chunk(self, index: int) -> tuple[np.ndarray, int]:
        epoch, k = divmod(index, self.per_epoch)
        return np.sort(self.data.order(epoch).chunk(k, self.size)), epoch
