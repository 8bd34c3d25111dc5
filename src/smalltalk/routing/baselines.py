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


def train_oracle_router(cfg: Config, data_dir: Path, out_dir: Path) -> dict:
    """The domain-label upper bound: groups of domains by train-split sequence counts (oracle_groups)."""
    data = SplitData(data_dir, "train")
    if not data.has_domains:
        raise SmalltalkError(f"routing.method=oracle needs domain labels; {data_dir} has none",
                             fix="prepare labelled data (data.domain_field) or use em/tfidf/random")
    counts = np.zeros(len(data.domain_names), dtype=np.int64)
    for start in range(0, len(data), 1 << 20):  # block by block: labels of 10^9 sequences never held at once
        labels = np.asarray(data.seq_domains[start:start + (1 << 20)], dtype=np.int64)
        counts += np.bincount(labels[labels >= 0], minlength=len(counts))
    groups = oracle_groups({n: int(c) for n, c in zip(data.domain_names, counts, strict=True)}, cfg.routing.experts)
    if any(not g for g in groups):
        raise SmalltalkError(f"{len(data.domain_names)} domains cannot fill {cfg.routing.experts} oracle groups",
                             fix="use at most as many experts as domains")
    manifest = _manifest(cfg, "oracle", data, groups=groups,
                         group_sequences=[int(sum(counts[data.domain_names.index(n)] for n in g)) for g in groups])
    with atomic_dir(out_dir) as tmp:
        write_json(manifest_of(tmp), manifest)
    return manifest


def train_tfidf_router(cfg: Config, data_dir: Path, out_dir: Path, iterations: int = 30,
                       components: int = 100) -> dict:
    """Fit tf-idf -> TruncatedSVD -> L2 norm on the prefix text of as many sequences as EM would see,
    then balanced k-means (assignment step = our balanced assignment on -distance)."""
    from sklearn.cluster import kmeans_plusplus
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import normalize

    rc = cfg.routing
    data = SplitData(data_dir, "train")
    tokenizer_json = TokenizerFiles(Path(data.manifest["tokenizer_dir"])).tokenizer_json
    decode = make_decoder(tokenizer_json)
    size = min(len(data), rc.chunk * max(1, rc.rounds))
    ids, _ = ChunkStream(data, size).chunk(0)
    texts = [decode(row) for row in data.batch(ids, rc.prefix)]
    vectorizer = TfidfVectorizer(sublinear_tf=True, max_features=100_000)
    matrix = vectorizer.fit_transform(texts)
    svd = TruncatedSVD(n_components=max(1, min(components, matrix.shape[1] - 1)), random_state=rc.seed)
    embedded = normalize(svd.fit_transform(matrix)).astype(np.float32)
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

