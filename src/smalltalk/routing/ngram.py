"""Count-based n-gram routers trained by the paper's EM: routing at the cost of table look-ups.

The paper's routers are small LMs whose only job is a prefix log-likelihood per expert. At its proportions
(4.4M routers, 335M experts) that costs ~1% of inference; at ours (26k routers, 41k experts) 42%. An n-gram
LM gives the same kind of score for E x (M - 1) look-ups and no matmul, and its M-step is counting:

    log p_e(x_1..x_M) = sum_s log (n_e(c_s, x_s) + beta p_e(x_s)) / (n_e(c_s) + beta)

with c_s the (order - 1) tokens before x_s (left-padded), n_e the counts of router e, beta the Dirichlet prior
(routing.ngram_prior; by default the vocabulary size: a weaker prior lets the sparse counts of a few thousand
prefixes decide, and EM then amplifies noise instead of domains) and p_e the add-one unigram. EM is the
paper's loop (round 0 split at random or from the tf-idf clustering, each round's M-step over the router's
share of a fresh chunk, the next chunk re-split by balanced assignment); counts of earlier rounds are kept at
weight routing.ngram_decay per round, as a neural router keeps what it learned. Contexts index a table
directly while V^order fits routing.ngram_buckets, else a multiplicative hash folds them into it (collisions
add counts of unrelated n-grams, never lose any).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from smalltalk.errors import SmalltalkError
from smalltalk.fsutil import atomic_dir, read_json, write_json
from smalltalk.layout import RouterFiles, manifest_of

# Operations per scored token and router (a hash, three look-ups, a division and a log), counted as FLOPs so
# that the n-gram routers' share of a budget is stated, not left out.
OPS_PER_TOKEN = 10
_HASH = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing's multiplier


class NgramRouters:
    """E count tables; score = prefix log-likelihood under each router's smoothed n-gram LM."""

    def __init__(self, pairs: np.ndarray, contexts: np.ndarray, unigrams: np.ndarray, order: int,
                 prior: float) -> None:
        self.pairs, self.contexts, self.unigrams = pairs, contexts, unigrams  # [E, P], [E, C], [E, V]
        self.order, self.prior = order, prior
        self.num_experts, self.vocab_size = unigrams.shape

    @classmethod
    def empty(cls, experts: int, vocab_size: int, order: int, prior: float, buckets: int) -> NgramRouters:
        pair_size, context_size = table_sizes(vocab_size, order, buckets)
        return cls(np.zeros((experts, pair_size), np.float32), np.zeros((experts, context_size), np.float32),
                   np.zeros((experts, vocab_size), np.float32), order, prior)

    def _keys(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(pair index, context index, target) of every scored position (tokens 2..M), each [N, M - 1]."""
        tokens = np.asarray(tokens, dtype=np.int64)
        pad = np.full((len(tokens), self.order - 1), self.vocab_size, dtype=np.int64)  # id V: before the start
        padded = np.concatenate([pad, tokens], axis=1)
        width = tokens.shape[1] - 1
        context = np.zeros((len(tokens), width), dtype=np.uint64)
        for j in range(self.order - 1):  # the (order - 1) tokens before each target, as one mixed-radix number
            column = padded[:, 1 + j:1 + j + width]
            context = context * np.uint64(self.vocab_size + 1) + column.astype(np.uint64)
        targets = tokens[:, 1:]
        pair = context * np.uint64(self.vocab_size) + targets.astype(np.uint64)
        contexts = (self.vocab_size + 1) ** (self.order - 1)
        return (_fold(pair, self.pairs.shape[1], contexts * self.vocab_size),
                _fold(context, self.contexts.shape[1], contexts), targets)

    def score(self, tokens: np.ndarray) -> np.ndarray:
        """[N, M] prefix tokens -> [N, E] float32 log-likelihoods of tokens 2..M."""
        pair, context, targets = self._keys(tokens)
        out = np.empty((len(pair), self.num_experts), dtype=np.float32)
        unigram_total = self.unigrams.sum(axis=1, dtype=np.float64) + self.vocab_size
        for e in range(self.num_experts):
            p_unigram = (self.unigrams[e][targets] + 1.0) / unigram_total[e]
            p = (self.pairs[e][pair] + self.prior * p_unigram) / (self.contexts[e][context] + self.prior)
            out[:, e] = np.log(p).sum(axis=1)
        return out

    def count(self, expert: int, tokens: np.ndarray) -> None:
        """The M-step of router `expert`: add the n-grams of prefixes [N, M] (the first token only as a context)."""
        pair, context, targets = self._keys(tokens)
        np.add.at(self.pairs[expert], pair.ravel(), 1.0)
        np.add.at(self.contexts[expert], context.ravel(), 1.0)
        np.add.at(self.unigrams[expert], targets.ravel(), 1.0)

    def scale(self, factor: float) -> None:
        """Every count times `factor`: EM's decay of earlier rounds, or an elastic router's calibration."""
        for table in (self.pairs, self.contexts, self.unigrams):
            table *= factor

    def mass(self) -> np.ndarray:
        """[E] the counted weight of each router (its unigram total): what the prior is weighed against."""
        return self.unigrams.sum(axis=1, dtype=np.float64)

    def row(self, expert: int) -> NgramRouters:
        """Router `expert` alone, as a set of one (an elastic mixture keeps one directory per router)."""
        return NgramRouters(self.pairs[expert:expert + 1].copy(), self.contexts[expert:expert + 1].copy(),
                            self.unigrams[expert:expert + 1].copy(), self.order, self.prior)

    @classmethod
    def stack(cls, routers: list[NgramRouters]) -> NgramRouters:
        """One set from several (the routers of an elastic mixture, in expert order); they must share order,
        prior and table sizes, or their scores would not be comparable."""
        shape = {(r.order, r.prior, r.pairs.shape[1], r.contexts.shape[1], r.vocab_size) for r in routers}
        if len(shape) != 1:
            raise SmalltalkError(f"these n-gram routers differ in (order, prior, table sizes, vocabulary): {shape}",
                                 fix="every router of a mixture needs the run's n-gram settings")
        return cls(*(np.concatenate([getattr(r, name) for r in routers]) for name in ("pairs", "contexts", "unigrams")),
                   routers[0].order, routers[0].prior)

    def save(self, directory: Path, manifest: dict | None = None) -> None:
        """The tables (npz: arrays only); with `manifest`, also the manifest that `load` reads (a router on
        its own: written atomically with it)."""
        if manifest is None:
            np.savez(RouterFiles(directory).ngram, pairs=self.pairs, contexts=self.contexts, unigrams=self.unigrams)
            return
        with atomic_dir(directory) as tmp:
            self.save(tmp)
            write_json(manifest_of(tmp), {**manifest, "experts": self.num_experts, "order": self.order,
                                          "prior": self.prior})

    @classmethod
    def load(cls, directory: Path, manifest: dict | None = None) -> NgramRouters:
        manifest = manifest or read_json(manifest_of(directory))
        with np.load(RouterFiles(directory).ngram, allow_pickle=False) as state:
            return cls(state["pairs"], state["contexts"], state["unigrams"], manifest["order"], manifest["prior"])


def table_sizes(vocab_size: int, order: int, buckets: int) -> tuple[int, int]:
    """Direct tables while every n-gram (and context) has its own cell within `buckets`, else `buckets`."""
    contexts = (vocab_size + 1) ** (order - 1)
    return min(contexts * vocab_size, buckets), min(contexts, buckets)


def _fold(keys: np.ndarray, size: int, space: int) -> np.ndarray:
    """Keys from [0, space) into [0, size): themselves when every key has a cell (a direct table), else a
    multiplicative hash."""
    keys = np.asarray(keys, dtype=np.uint64)
    if space <= size:
        return keys.astype(np.int64)
    bits = size.bit_length() - 1  # size: a power of two (routing.ngram_buckets, checked)
    return ((keys * _HASH) >> np.uint64(64 - bits)).astype(np.int64)  # Fibonacci hashing: the top bits
