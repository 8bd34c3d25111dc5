"""Partition the training split: score every sequence's prefix, balanced assignment per chunk.

RUN/partition/expert_NN.npy holds the sorted sequence ids of expert NN. Under torchrun each rank scores
whole batches r, r+W, r+2W, ... (the same batches one process would form, so scores are bitwise equal),
scores are all-gathered and rank 0 writes the same bytes as a single process.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import torch

from smalltalk.config import Config
from smalltalk.data.shards import SplitData
from smalltalk.distributed import init_distributed
from smalltalk.errors import SmalltalkError
from smalltalk.fsutil import atomic_dir, read_json, sha256_file, write_json
from smalltalk.layout import WEIGHTS, PartitionFiles, RouterFiles, RunLayout, manifest_of, read_manifest
from smalltalk.routing.assignment import argmax_assignment, balanced_assignment, capacities
from smalltalk.routing.metrics import domain_mix, split_quality
from smalltalk.routing.routers import load_routers, score_split


def score_distributed(router, data: SplitData, prefix: int, batch_size: int) -> np.ndarray:
    """[N, E] scores of the whole split; batches are spread over torchrun ranks and gathered."""
    dist = init_distributed("cpu")
    n = len(data)
    starts = list(range(0, n, batch_size))[dist.rank::dist.world_size]
    mine = {s: score_split(router, data, np.arange(s, min(n, s + batch_size)), prefix, batch_size) for s in starts}
    if dist.enabled:
        gathered: list = [None] * dist.world_size
        torch.distributed.all_gather_object(gathered, mine)
        for part in gathered:
            mine.update(part)
    scores = np.empty((n, router.num_experts), dtype=np.float32)
    for start, block in mine.items():
        scores[start:start + len(block)] = block
    return scores


def check_invariants(assignment: np.ndarray, experts: int, chunk: int) -> None:
    """Every sequence exactly once; per chunk, loads equal the capacities (within 1 of each other)."""
    if assignment.min() < 0 or assignment.max() >= experts:
        raise SmalltalkError("partition invariant broken: a sequence has no valid expert")
    for start in range(0, len(assignment), chunk):
        part = assignment[start:start + chunk]
        loads = np.bincount(part, minlength=experts)
        if not np.array_equal(loads, capacities(len(part), experts)) or loads.max() - loads.min() > 1:
            raise SmalltalkError(f"partition invariant broken: loads {loads.tolist()} in chunk at {start}")


def partition(routers_dir: Path, data_dir: Path, out_dir: Path, prefix: int | None = None,
              chunk_size: int | None = None, batch_size: int = 256, device: str = "cpu", compile: bool = False,
              workers: int | None = None) -> dict:
    started = time.perf_counter()
    routers_manifest = read_manifest(routers_dir, "run `smalltalk routers train` first")
    router = load_routers(routers_dir, device, batch_size, compile, workers)
    data = SplitData(data_dir, "train")
    prefix = prefix or routers_manifest["prefix"]
    if not 2 <= prefix <= data.seq_len:
        raise SmalltalkError(f"prefix={prefix} must be in [2, seq_len={data.seq_len}]")
    experts, n = router.num_experts, len(data)
    chunk = chunk_size or n
    scores = score_distributed(router, data, prefix, batch_size)
    assignment = np.concatenate([balanced_assignment(scores[s:s + chunk]) for s in range(0, n, chunk)])
    check_invariants(assignment, experts, chunk)
    shares = [np.flatnonzero(assignment == e) for e in range(experts)]  # sorted by construction
    if not np.array_equal(np.sort(np.concatenate(shares)), np.arange(n)):
        raise SmalltalkError("partition invariant broken: not every sequence exactly once")
    labels = data.seq_domains
    top2 = np.sort(scores, axis=1)[:, -2:] if experts > 1 else np.zeros((n, 2))
    manifest = {
        "kind": "partition", "method": routers_manifest["method"], "experts": experts, "prefix": prefix,
        "sequences": n, "chunk_size": chunk, "counts": [len(s) for s in shares],
        "routers": str(Path(routers_dir).resolve()), "routers_sha256": routers_checksum(Path(routers_dir)),
        "data": str(Path(data_dir).resolve()), "data_sha256": data.manifest["splits"]["train"]["sha256"],
        "score_stats": {"best_mean": float(scores.max(1).mean()), "best_std": float(scores.max(1).std()),
                        "margin_mean": float((top2[:, 1] - top2[:, 0]).mean()),
                        "argmax_loads": np.bincount(argmax_assignment(scores), minlength=experts).tolist(),
                        "moved_by_balancing": float((argmax_assignment(scores) != assignment).mean())},
        "domain_mix": domain_mix(assignment, labels, experts, data.domain_names) if data.has_domains else None,
        **({"quality": split_quality(assignment, labels)} if data.has_domains else {}),
        "files": [PartitionFiles.share_name(e) for e in range(experts)],
    }
    dist = init_distributed("cpu")
    if dist.is_main:
        with atomic_dir(out_dir) as tmp:
            for e, ids in enumerate(shares):
                np.save(PartitionFiles(tmp).share(e), ids.astype(np.int64))
            manifest["sha256"] = {f: sha256_file(tmp / f) for f in manifest["files"]}
            manifest["seconds"] = round(time.perf_counter() - started, 3)
            write_json(manifest_of(tmp), manifest)
    dist.barrier()
    return manifest


def partition_run(cfg: Config, run: RunLayout, prefix: int | None = None, chunk_size: int | None = None,
                  device: str | None = None) -> dict:
    """The partition stage of a run: RUN/routers score RUN/data's train split into RUN/partition."""
    rc = cfg.routing
    return partition(run.routers, run.data, run.partition, prefix, chunk_size or rc.partition_chunk,
                     rc.score_batch_size, device or "cpu", rc.compile, rc.score_workers)


def routers_checksum(routers_dir: Path) -> str:
    """sha256 over what defines the routers: manifest, final weights, tf-idf state."""
    digest = hashlib.sha256()
    layout, names = RouterFiles(routers_dir), read_json(manifest_of(routers_dir)).get("routers", [])
    files = [manifest_of(routers_dir), *[layout.router(name).model / WEIGHTS for name in sorted(names)],
             *([layout.tfidf] if layout.tfidf.is_file() else [])]
    for path in files:
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def load_share(partition_dir: Path, expert: int) -> np.ndarray:
    path = _need(PartitionFiles(Path(partition_dir)).share(expert), "run `smalltalk partition` first")
    return np.load(path)


def _need(path: Path, fix: str) -> Path:
    if not path.is_file():
        raise SmalltalkError(f"missing {path}", fix=fix)
    return path
