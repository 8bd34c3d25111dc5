"""The evaluation's arithmetic, one batch at a time: the sums every table of `smalltalk eval` needs.

Per batch of test sequences: the routers score the prefixes of every M̂ of the sweep; each expert scores
only the rows that some M̂ routes to it or that a top-k ensemble uses (or every row with `score_all`); the
per-token NLL then reduces to sums (mixture and dense, all tokens and after M̂; per expert and per domain at
the main M̂; each top-k/temperature ensemble) and is dropped. Memory is O(batch x S x E), whatever the size
of the test split; perplexity = exp(sum of NLL / tokens), the same figures as from whole matrices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from smalltalk.hub.modeling_smalltalk import choose_experts
from smalltalk.routing.assignment import argmax_assignment


@dataclass
class _Sum:
    nll: float = 0.0
    tokens: int = 0
    sequences: int = 0

    def add(self, part: np.ndarray) -> None:
        """`part`: [sequences, positions] NLL."""
        self.nll += float(part.sum())
        self.tokens += int(part.size)
        self.sequences += int(part.shape[0])

    def ppl(self) -> dict:
        return {"ppl": math.exp(self.nll / self.tokens) if self.tokens else float("nan"), "tokens": self.tokens}


@dataclass
class MixtureTally:
    experts: int
    prefixes: list[int]  # the sweep, main prefix included
    main_prefix: int
    dense_kinds: list[str]
    top_k: list[tuple[int, float]]  # (k, temperature) ensembles
    groups: int  # domains (0: unlabelled)
    score_all: bool = False
    sums: dict = field(default_factory=dict)  # (name, prefix, "all"|"after") -> _Sum
    loads: dict = field(default_factory=dict)  # prefix -> expert counts
    by_expert: dict = field(default_factory=dict)  # (name, expert) -> _Sum after the main prefix
    by_domain: dict = field(default_factory=dict)  # (name, domain) -> _Sum after the main prefix
    used: np.ndarray | None = None  # [domains, experts] sequences per (domain, chosen expert)
    expert_domain: np.ndarray | None = None  # score_all: [experts, domains, 2] NLL sum, tokens after main M̂

    def __post_init__(self) -> None:
        self.used = np.zeros((max(self.groups, 1), self.experts), dtype=np.int64)
        if self.score_all:
            self.expert_domain = np.zeros((self.experts, max(self.groups, 1), 2))

    def _sum(self, table: dict, key) -> _Sum:
        return table.setdefault(key, _Sum())

    def needed(self, scores: dict[int, np.ndarray]) -> list[np.ndarray]:
        """Per expert: the batch rows whose NLL under it some table uses."""
        rows = len(next(iter(scores.values())))
        need = np.ones((rows, self.experts), bool) if self.score_all else np.zeros((rows, self.experts), bool)
        for prefix in self.prefixes:
            need[np.arange(rows), argmax_assignment(scores[prefix])] = True
        k_max = max([k for k, _ in self.top_k] or [0])
        if k_max:
            top = np.argsort(-scores[self.main_prefix], axis=1, kind="stable")[:, :k_max]
            need[np.arange(rows)[:, None], top] = True
        return [np.flatnonzero(need[:, e]) for e in range(self.experts)]

    def add_batch(self, scores: dict[int, np.ndarray], expert_nll: dict[int, np.ndarray],
                  dense_nll: dict[str, np.ndarray], labels: np.ndarray | None) -> None:
        """`expert_nll[e]`: [rows, S-1] float64 with the rows `needed` filled (others are never read)."""
        rows = np.arange(len(scores[self.main_prefix]))
        stacked = np.stack([expert_nll[e] for e in range(self.experts)])  # [E, rows, S-1], one copy per batch
        for prefix in self.prefixes:
            chosen = argmax_assignment(scores[prefix])
            mix = stacked[chosen, rows]
            self._add_pair("mixture", prefix, mix)
            for kind, nll in dense_nll.items():
                self._add_pair(f"dense_{kind}", prefix, nll)
            self.loads[prefix] = self.loads.get(prefix, 0) + np.bincount(chosen, minlength=self.experts)
            if prefix == self.main_prefix:
                self._add_groups(chosen, mix, dense_nll, labels)
        for k, temperature in self.top_k:
            mixed = _ensemble(scores[self.main_prefix], stacked, k, temperature)
            self._add_pair(f"top{k}@{temperature}", self.main_prefix, -mixed)
        if self.score_all:
            group = labels if labels is not None and self.groups else np.zeros(len(rows), int)
            for e in range(self.experts):
                after = expert_nll[e][:, self.main_prefix - 1:]
                for g in np.unique(group[group >= 0]):
                    self.expert_domain[e, g] += (after[group == g].sum(), after[group == g].size)

    def _add_pair(self, name: str, prefix: int, nll: np.ndarray) -> None:
        self._sum(self.sums, (name, prefix, "all")).add(nll)
        self._sum(self.sums, (name, prefix, "after")).add(nll[:, prefix - 1:])

    def _add_groups(self, chosen: np.ndarray, mix: np.ndarray, dense: dict, labels: np.ndarray | None) -> None:
        first = self.main_prefix - 1
        for e in np.unique(chosen):
            mask = chosen == e
            self._sum(self.by_expert, ("mixture", int(e))).add(mix[mask, first:])
            for kind, nll in dense.items():
                self._sum(self.by_expert, (f"dense_{kind}", int(e))).add(nll[mask, first:])
        if labels is None or not self.groups:
            return
        for g in np.unique(labels[labels >= 0]):
            mask = labels == g
            self._sum(self.by_domain, ("mixture", int(g))).add(mix[mask, first:])
            for kind, nll in dense.items():
                self._sum(self.by_domain, (f"dense_{kind}", int(g))).add(nll[mask, first:])
            np.add.at(self.used[g], chosen[mask], 1)

    # -- the tables ----------------------------------------------------------------------------------------
    def sweep(self) -> list[dict]:
        out = []
        for prefix in self.prefixes:
            row = {"prefix": prefix, "loads": self.loads[prefix].tolist(),
                   "mixture_all": self.sums[("mixture", prefix, "all")].ppl(),
                   "mixture_after": self.sums[("mixture", prefix, "after")].ppl()}
            for kind in self.dense_kinds:
                row[f"dense_{kind}_all"] = self.sums[(f"dense_{kind}", prefix, "all")].ppl()
                row[f"dense_{kind}_after"] = self.sums[(f"dense_{kind}", prefix, "after")].ppl()
            out.append(row)
        return out

    def per_expert(self) -> list[dict]:
        rows = []
        for e in range(self.experts):
            if ("mixture", e) not in self.by_expert:
                continue
            total = self.by_expert[("mixture", e)]
            row = {"group": e, "sequences": total.sequences,
                   "mixture_after": total.ppl()["ppl"], "experts_used": [e]}
            for kind in self.dense_kinds:
                row[f"dense_{kind}_after"] = self.by_expert[(f"dense_{kind}", e)].ppl()["ppl"]
            rows.append(row)
        return rows

    def per_domain(self, names: list[str]) -> list[dict]:
        rows = []
        for g, name in enumerate(names):
            if ("mixture", g) not in self.by_domain:
                continue
            total = self.by_domain[("mixture", g)]
            row = {"group": name, "sequences": total.sequences,
                   "mixture_after": total.ppl()["ppl"], "experts_used": np.flatnonzero(self.used[g]).tolist()}
            for kind in self.dense_kinds:
                row[f"dense_{kind}_after"] = self.by_domain[(f"dense_{kind}", g)].ppl()["ppl"]
            rows.append(row)
        return rows

    def top_k_table(self) -> list[dict]:
        return [{"k": k, "temperature": t, "expert_forwards": k,
                 "after": self.sums[(f"top{k}@{t}", self.main_prefix, "after")].ppl(),
                 "all": self.sums[(f"top{k}@{t}", self.main_prefix, "all")].ppl()} for k, t in self.top_k]

    def expert_x_domain(self, names: list[str]) -> list[dict] | None:
        """score_all: every expert's perplexity after the main M̂ on every domain's sequences."""
        if self.expert_domain is None:
            return None
        labels = names or ["all"]
        return [{"expert": e, **{labels[g]: math.exp(s / n) for g, (s, n) in enumerate(self.expert_domain[e]) if n}}
                for e in range(self.experts)]


def _ensemble(scores: np.ndarray, stacked: np.ndarray, k: int, temperature: float) -> np.ndarray:
    """c-BTM's rule: log of the top-k experts' next-token probabilities mixed with softmax(score / T) weights;
    each expert's probability of the actual next token, so no extra forward passes."""
    rows = np.arange(scores.shape[0])
    top, weights = (t.numpy() for t in choose_experts(torch.from_numpy(np.asarray(scores, np.float64)), k, temperature))
    log_w = np.log(weights)
    parts = [log_w[:, j, None] - stacked[top[:, j], rows] for j in range(k)]  # stacked: [E, rows, S-1] NLL
    return np.logaddexp.reduce(parts, axis=0)
