"""The router interface shared by EM routers and the tf-idf and random baselines.

A router set maps prefix token ids [N, M] to scores [N, E] (higher = better fit); argmax of a row is the
inference route and balanced_assignment of a matrix is the training partition. RUN/routers/manifest.json
says which kind is stored there.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from smalltalk.errors import SmalltalkError
from smalltalk.fsutil import read_json, sha256_file
from smalltalk.layout import WEIGHTS, RouterFiles, manifest_of
from smalltalk.routing.grouped import GroupedRouters, groupable
from smalltalk.routing.scoring import default_workers, score_batches, scoring_body


class Router(Protocol):
    num_experts: int

    def score(self, tokens: np.ndarray) -> np.ndarray:
        """[N, M] int prefix tokens -> [N, E] float32 scores."""


class LMRouters:
    """E router language models; score = prefix log-likelihood (uniform prior).

    workers: routers scored side by side (None: one per CPU thread, see scoring.default_workers). It
    changes the process-wide intra-op thread count while scoring, so a server that generates in other
    threads keeps workers=1.
    grouped: score all E routers as one batched forward (routing/grouped.py) on GPU, and on CPU for
    batches of at most GROUPED_CPU_TOKENS prefix tokens (a served prompt), where launches, not FLOPs, cost.
    Larger CPU batches run the per-router loop: there a router's own full-size matmuls keep BLAS busier.
    """

    GROUPED_CPU_TOKENS = 512

    def __init__(self, models: list[torch.nn.Module], device: str | torch.device = "cpu",
                 batch_size: int = 256, compile: bool = False, workers: int | None = None,
                 dtype: str = "float32", grouped: bool = True) -> None:
        self.models = [m.to(device).eval() for m in models]
        self.device, self.batch_size, self.workers = torch.device(device), batch_size, workers
        # "bfloat16": the bodies run under bf16 autocast (as the routers trained); log-probs stay fp32
        self.autocast_dtype = torch.bfloat16 if dtype == "bfloat16" else None
        self.num_experts = len(models)
        self.bodies = [scoring_body(m, compile) for m in self.models]
        self.grouped = GroupedRouters(self.models, self.device) if grouped and not compile and groupable(
            self.models) else None

    @classmethod
    def from_model_dirs(cls, model_dirs: list[Path], device: str = "cpu", batch_size: int = 256,
                        compile: bool = False, workers: int | None = None, dtype: str = "float32") -> LMRouters:
        from transformers import AutoModelForCausalLM

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        models = [AutoModelForCausalLM.from_pretrained(str(path)) for path in model_dirs]
        return cls(models, device, batch_size, compile, workers, dtype)

    def score(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int64)
        if self.grouped is not None and (self.device.type != "cpu" or tokens.size <= self.GROUPED_CPU_TOKENS):
            return self._score_grouped(tokens)
        workers = self.workers or default_workers(self.device, self.num_experts)
        return score_batches(self.models, lambda rows: tokens[rows], np.arange(len(tokens)), self.batch_size,
                             self.device, self.autocast_dtype, bodies=self.bodies, workers=workers)

    def _score_grouped(self, tokens: np.ndarray) -> np.ndarray:
        out = np.empty((len(tokens), self.num_experts), dtype=np.float32)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                                    enabled=self.autocast_dtype is not None):
            for start in range(0, len(tokens), self.batch_size):
                x = torch.from_numpy(tokens[start:start + self.batch_size]).to(self.device)
                out[start:start + len(x)] = self.grouped.prefix_loglik(x).cpu().numpy()
        return out


class RandomRouter:
    """Seeded pseudo-random scores from a hash of the prefix: balanced assignment of them is a seeded
    balanced random split, argmax is a hash route at inference."""

    def __init__(self, num_experts: int, seed: int = 0) -> None:
        self.num_experts, self.seed = num_experts, seed

    def score(self, tokens: np.ndarray) -> np.ndarray:
        out = np.empty((len(tokens), self.num_experts), dtype=np.float32)
        for i, row in enumerate(np.asarray(tokens, dtype=np.int64)):
            digest = hashlib.blake2b(row.tobytes(), digest_size=8, key=self.seed.to_bytes(8, "little")).digest()
            out[i] = np.random.default_rng(int.from_bytes(digest, "little")).random(self.num_experts)
        return out


class OracleRouter:
    """Routing by domain label (an upper bound for studies, never a servable router): expert e takes the
    domains of group e. Scores 0 for the own group, -1 elsewhere (unlabelled sequences: all 0). It needs
    each sequence's label, so it scores through `score_split`, never from tokens alone."""

    needs_labels = True

    def __init__(self, groups: list[list[str]]) -> None:
        self.groups, self.num_experts = groups, len(groups)
        self.group_of = {name: e for e, names in enumerate(groups) for name in names}

    def score(self, tokens: np.ndarray) -> np.ndarray:
        raise SmalltalkError("oracle routing needs each sequence's domain label; a prompt has none",
                             fix="use the oracle for `smalltalk eval` and partition only (an upper bound)")

    def score_labels(self, labels: np.ndarray, names: list[str]) -> np.ndarray:
        """[N] domain ids of a dataset whose domain names are `names` -> [N, E] scores."""
        lookup = np.array([self.group_of.get(name, -1) for name in names] + [-1], dtype=np.int64)
        group = lookup[np.asarray(labels, dtype=np.int64)]  # label -1 -> the appended -1
        out = np.full((len(group), self.num_experts), -1.0, dtype=np.float32)
        known = group >= 0
        out[np.flatnonzero(known), group[known]] = 0.0
        out[~known] = 0.0
        return out


class TfidfRouter:
    """c-BTM style: tf-idf of the prefix text -> TruncatedSVD -> L2 norm; score = -distance to centroids.
    Stored as arrays (vocabulary, idf, SVD components, centroids) and recomputed here exactly as sklearn's
    TfidfVectorizer(sublinear_tf=True) + TruncatedSVD.transform do."""

    def __init__(self, decode, vocabulary: dict[str, int], idf: np.ndarray, components: np.ndarray,
                 centroids: np.ndarray) -> None:
        from sklearn.feature_extraction.text import CountVectorizer

        self.decode, self.idf, self.components = decode, np.asarray(idf), np.asarray(components)
        self.counter = CountVectorizer(vocabulary=vocabulary)  # TfidfVectorizer's own tokenisation
        self.centroids = centroids.astype(np.float32)
        self.num_experts = len(centroids)

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        from sklearn.preprocessing import normalize

        counts = self.counter.transform([self.decode(row) for row in np.asarray(tokens)]).astype(np.float64)
        counts.data = np.log(counts.data) + 1.0  # sublinear tf
        tfidf = normalize(counts.multiply(self.idf).tocsr())
        return normalize(np.asarray(tfidf @ self.components.T)).astype(np.float32)

    def score(self, tokens: np.ndarray) -> np.ndarray:
        return neg_distance(self.embed(tokens), self.centroids)


def neg_distance(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """-Euclidean distance of each row of x to each centroid: [N, E] float32."""
    sq = (x**2).sum(1)[:, None] - 2 * x @ centroids.T + (centroids**2).sum(1)[None, :]
    return -np.sqrt(np.maximum(sq, 0.0)).astype(np.float32)


def make_decoder(tokenizer_json: Path):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    return lambda row: tokenizer.decode([int(t) for t in row], skip_special_tokens=False)


def load_routers(routers_dir: str | Path, device: str = "cpu", batch_size: int = 256, compile: bool = False,
                 workers: int | None = None, dtype: str = "float32") -> Router:
    routers_dir = Path(routers_dir)
    manifest_path, files = manifest_of(routers_dir), RouterFiles(routers_dir)
    if not manifest_path.is_file():
        raise SmalltalkError(f"no trained routers at {routers_dir}", fix="run `smalltalk routers train` first")
    manifest = read_json(manifest_path)
    method = manifest["method"]
    if method == "em":
        return LMRouters.from_model_dirs([files.router(name).model for name in manifest["routers"]], device,
                                         batch_size, compile, workers, dtype)
    if method == "ngram":
        from smalltalk.routing.ngram import NgramRouters

        return NgramRouters.load(routers_dir, manifest)
    if method == "random":
        return RandomRouter(manifest["experts"], manifest["seed"])
    if method == "oracle":
        return OracleRouter(manifest["groups"])
    if method == "tfidf":
        if not files.tfidf.is_file() and files.legacy_pickle.is_file():
            raise SmalltalkError("a pickled tf-idf router is not loaded: unpickling a file can run any code",
                                 where=str(files.legacy_pickle),
                                 fix="retrain it with `smalltalk routers train --method tfidf` (arrays + JSON)")
        with np.load(files.tfidf, allow_pickle=False) as state:
            arrays = {k: state[k] for k in ("idf", "components", "centroids")}
        vocabulary = read_json(files.tfidf_vocab)
        return TfidfRouter(make_decoder(files.tokenizer_json), vocabulary, **arrays)
    raise SmalltalkError(f"unknown routing method {method!r} in {manifest_path}")


def load_router_dirs(method: str, dirs: list[Path], device: str = "cpu", batch_size: int = 256,
                     workers: int | None = None) -> Router:
    """The routers of an elastic mixture (mixture.json's router_dirs): one directory per expert, in expert
    order, each a router LM or one n-gram router."""
    if method == "ngram":
        from smalltalk.routing.ngram import NgramRouters

        return NgramRouters.stack([NgramRouters.load(d) for d in dirs])
    return LMRouters.from_model_dirs(dirs, device, batch_size, workers=workers)


def score_split(router: Router, data, ids: np.ndarray, prefix: int, batch_size: int = 1024) -> np.ndarray:
    """Scores [len(ids), E] of the first `prefix` tokens of sequences `ids` of a SplitData (by their labels
    for the oracle)."""
    if getattr(router, "needs_labels", False):
        return router.score_labels(np.asarray(data.seq_domains[np.asarray(ids)]), data.domain_names)
    out = np.empty((len(ids), router.num_experts), dtype=np.float32)
    for start in range(0, len(ids), batch_size):
        out[start:start + batch_size] = router.score(data.batch(ids[start:start + batch_size], prefix))
    return out


def routers_checksum(routers_dir: Path) -> str:
    """sha256 over what defines the routers: manifest, final weights, tf-idf state."""
    digest = hashlib.sha256()
    layout, manifest = RouterFiles(routers_dir), read_json(manifest_of(routers_dir))
    where = ("data", "tokenizer_dir")  # where the routers were made, not what they are: a moved run keeps its sum
    digest.update(json.dumps({k: v for k, v in manifest.items() if k not in where}, sort_keys=True).encode())
    files = [*[layout.router(name).model / WEIGHTS for name in sorted(manifest.get("routers", []))],
             *[p for p in (layout.tfidf, layout.tfidf_vocab, layout.ngram) if p.is_file()]]
    for path in files:
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()
