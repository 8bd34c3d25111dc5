"""Baseline routers with the EM routers' interface: tf-idf + balanced k-means (c-BTM) and random."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from smalltalk.config import Config
from smalltalk.data.order import ChunkStream
from smalltalk.data.shards import SplitData
from smalltalk.errors import SmalltalkError
from smalltalk.fsutil import atomic_dir, write_json
from smalltalk.layout import RouterFiles, TokenizerFiles, manifest_of
from smalltalk.routing.assignment import balanced_assignment
from smalltalk.routing.metrics import split_quality
from smalltalk.routing.routers import make_decoder, neg_distance


def _manifest(cfg: Config, method: str, data: SplitData, **extra) -> dict:
    rc = cfg.routing
    return {"kind": "routers", "method": method, "experts": rc.experts, "prefix": rc.prefix, "seed": rc.seed,
            "data": str(data.dir.resolve()), "data_sha256": data.manifest["splits"]["train"]["sha256"], **extra}


def train_random_router(cfg: Config, data_dir: Path, out_dir: Path) -> dict:
    """Nothing to fit: the manifest (E, seed) is the router."""
    data = SplitData(data_dir, "train")
    manifest = _manifest(cfg, "random", data)
    with atomic_dir(out_dir) as tmp:
        write_json(manifest_of(tmp), manifest)
    return manifest


def oracle_groups(counts: dict[str, int], experts: int) -> list[list[str]]:
    """Domains into E groups of near-equal size: largest domain first, each to the group with the fewest
    sequences so far (ties: lower group index). With fewer domains than experts, groups stay empty."""
    groups: list[list[str]] = [[] for _ in range(experts)]
    sizes = [0] * experts
    for name in sorted(counts, key=lambda d: (-counts[d], d)):
        e = min(range(experts), key=lambda g: (sizes[g], g))
        groups[e].append(name)
        sizes[e] += counts[name]
    return groups


SIMILAR_GROUP_CAP = 1.5  # a similarity group may hold up to 1.5x an expert's share (partition balances the rest)


def similar_groups(centroids: np.ndarray, counts: dict[str, int], experts: int) -> list[list[str]]:
    """Domains into E groups of related domains: start from one group per domain and merge, again and again,
    the two groups whose count-weighted centroids have the highest cosine similarity, among the pairs whose
    merged size stays within SIMILAR_GROUP_CAP x an expert's share (none fits: the two smallest groups).
    `centroids` [D, F]: one feature centroid per domain, in the order of `counts`."""
    names = list(counts)
    groups = [[n] for n in names]
    sums = [centroids[i].astype(np.float64) * counts[n] for i, n in enumerate(names)]
    sizes = [counts[n] for n in names]
    cap = SIMILAR_GROUP_CAP * sum(sizes) / experts
    while len(groups) > experts:
        unit = [v / max(np.linalg.norm(v), 1e-12) for v in sums]
        pairs = [(a, b) for a in range(len(groups)) for b in range(a + 1, len(groups))]
        fitting = [p for p in pairs if sizes[p[0]] + sizes[p[1]] <= cap]
        if fitting:
            a, b = max(fitting, key=lambda p: (float(unit[p[0]] @ unit[p[1]]), -p[0], -p[1]))
        else:
            a, b = sorted(sorted(range(len(groups)), key=lambda g: (sizes[g], g))[:2])
        groups[a], sums[a], sizes[a] = groups[a] + groups[b], sums[a] + sums[b], sizes[a] + sizes[b]
        del groups[b], sums[b], sizes[b]
    return [sorted(g) for g in groups]


def domain_centroids(cfg: Config, data: SplitData) -> tuple[np.ndarray, list[str]]:
    """Each domain's mean tf-idf feature vector (the `tfidf` router's features) over the seeded sample of
    prefixes the tf-idf router would fit on; the domain names in label order."""
    ids, embedded, *_ = _tfidf_features(cfg, data)
    labels = np.asarray(data.seq_domains[ids])
    dims = embedded.shape[1]
    centroids = np.stack([embedded[labels == d].mean(axis=0) if (labels == d).any() else np.zeros(dims)
                          for d in range(len(data.domain_names))])
    return centroids, list(data.domain_names)


def train_oracle_router(cfg: Config, data_dir: Path, out_dir: Path) -> dict:
    """The domain-label references: domains grouped by train-split sequence counts into near-equal groups
    (`routing.oracle_grouping: balanced`, oracle_groups), or related domains together (`similar`,
    similar_groups on tf-idf domain centroids): a prompt has no label, so neither is a servable method."""
    data = SplitData(data_dir, "train")
    if not data.has_domains:
        raise SmalltalkError(f"routing.method=oracle needs domain labels; {data_dir} has none",
                             fix="prepare labelled data (data.domain_field) or use em/tfidf/random")
    counts = np.zeros(len(data.domain_names), dtype=np.int64)
    for start in range(0, len(data), 1 << 20):  # block by block: labels of 10^9 sequences never held at once
        labels = np.asarray(data.seq_domains[start:start + (1 << 20)], dtype=np.int64)
        counts += np.bincount(labels[labels >= 0], minlength=len(counts))
    by_name = {n: int(c) for n, c in zip(data.domain_names, counts, strict=True)}
    if cfg.routing.oracle_grouping == "similar":
        centroids, _ = domain_centroids(cfg, data)
        groups = similar_groups(centroids, by_name, cfg.routing.experts)
    else:
        groups = oracle_groups(by_name, cfg.routing.experts)
    if any(not g for g in groups):
        raise SmalltalkError(f"{len(data.domain_names)} domains cannot fill {cfg.routing.experts} oracle groups",
                             fix="use at most as many experts as domains")
    manifest = _manifest(cfg, "oracle", data, groups=groups, grouping=cfg.routing.oracle_grouping,
                         group_sequences=[int(sum(counts[data.domain_names.index(n)] for n in g)) for g in groups])
    with atomic_dir(out_dir) as tmp:
        write_json(manifest_of(tmp), manifest)
    return manifest


def train_tfidf_router(cfg: Config, data_dir: Path, out_dir: Path, iterations: int = 30,
                       components: int = 100) -> dict:
    """Fit tf-idf -> TruncatedSVD -> L2 norm on the prefix text of as many sequences as EM would see,
    then balanced k-means (assignment step = our balanced assignment on -distance)."""
    from sklearn.cluster import kmeans_plusplus

    rc = cfg.routing
    data = SplitData(data_dir, "train")
    ids, embedded, vectorizer, svd, tokenizer_json = _tfidf_features(cfg, data, components)
    centroids, _ = kmeans_plusplus(embedded, rc.experts, random_state=rc.seed)
    assignment = np.full(len(ids), -1)
    for iteration in range(iterations):  # noqa: B007 - reported in the manifest
        new = balanced_assignment(neg_distance(embedded, centroids.astype(np.float32)))
        if np.array_equal(new, assignment):
            break
        assignment = new
        centroids = np.stack([embedded[assignment == e].mean(axis=0) for e in range(rc.experts)])
    fit_quality = split_quality(assignment, data.seq_domains[ids])
    manifest = _manifest(cfg, "tfidf", data, fit_sequences=len(ids), kmeans_iterations=iteration + 1,
                         svd_components=svd.n_components, fit_quality=fit_quality)
    with atomic_dir(out_dir) as tmp:
        files = RouterFiles(tmp)
        np.savez(files.tfidf, idf=vectorizer.idf_, components=svd.components_, centroids=centroids.astype(np.float32))
        write_json(files.tfidf_vocab, {term: int(i) for term, i in vectorizer.vocabulary_.items()})
        shutil.copy(tokenizer_json, files.tokenizer_json)
        write_json(manifest_of(tmp), manifest)
    return manifest


def _tfidf_features(cfg: Config, data: SplitData, components: int = 100):
    """tf-idf -> TruncatedSVD -> L2 norm of the prefix text of the first min(N, chunk x rounds) sequences of
    the seeded order: (ids, features [n, F], vectorizer, svd, tokenizer.json path)."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import normalize

    rc = cfg.routing
    tokenizer_json = TokenizerFiles(Path(data.manifest["tokenizer_dir"])).tokenizer_json
    decode = make_decoder(tokenizer_json)
    size = min(len(data), rc.chunk * max(1, rc.rounds))
    ids, _ = ChunkStream(data, size).chunk(0)
    texts = [decode(row) for row in data.batch(ids, rc.prefix)]
    vectorizer = TfidfVectorizer(sublinear_tf=True, max_features=100_000)
    matrix = vectorizer.fit_transform(texts)
    svd = TruncatedSVD(n_components=max(1, min(components, matrix.shape[1] - 1)), random_state=rc.seed)
    embedded = normalize(svd.fit_transform(matrix)).astype(np.float32)
    return ids, embedded, vectorizer, svd, tokenizer_json
