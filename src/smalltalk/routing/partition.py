"""Partition the training split into E shares, chunk by chunk, in memory bounded by the chunk.

Chunk j is positions [jC, (j+1)C) of the train split's seeded order (data/order.py), so every chunk is a
uniform sample of the corpus whatever the order of the input files. Per chunk: score the prefixes with all
routers, balanced assignment (capacity C/E each), append each expert's ids to its output, keep only
running statistics. Nothing of size N is held: peak memory is O(C x E) scores + O(C) ids.

Chunks [I, J) form a *part*, written atomically to OUT.parts/ (raw ids per expert + per-chunk statistics).
Parts are independent, resumable jobs (`smalltalk partition --chunks I:J`, `smalltalk launch --stage
partition`); the merge concatenates them in chunk order into OUT/expert_NN.npy and sums the per-chunk
statistics in chunk order, so the bytes are the same however the chunks were cut into parts. Under
torchrun the ranks split each chunk's scoring batches (the batches one process forms, so scores are
bitwise equal) and all-gather score tensors; rank 0 assigns and writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from smalltalk.config import Config
from smalltalk.data.shards import SplitData
from smalltalk.errors import SmalltalkError
from smalltalk.fsutil import atomic_dir, read_json, remove_tree, sha256_file, write_json
from smalltalk.layout import PartitionFiles, RunLayout, manifest_of, read_manifest
from smalltalk.routing.assignment import argmax_assignment, balanced_assignment, capacities, check_finite
from smalltalk.routing.metrics import contingency, mix_from_table, quality_from_table
from smalltalk.routing.routers import load_routers, routers_checksum, score_split
from smalltalk.training.distributed import DistContext, init_distributed, resolve_device
from smalltalk.training.host_memory import keep_freed_memory, return_free_memory

_COPY_BLOCK = 1 << 20  # ids copied at once by the merge


@dataclass(frozen=True)
class PartitionJob:
    routers_dir: Path
    data_dir: Path
    out_dir: Path
    prefix: int | None = None  # None: the routers' training prefix
    chunk_size: int | None = 65536  # None: one chunk (the whole split; memory O(N x E))
    batch_size: int = 256
    device: str = "cpu"
    compile: bool = False
    workers: int | None = None
    part_chunks: int = 64  # chunks per part when this process fills the gaps itself
    dtype: str = "float32"  # "bfloat16": score under bf16 autocast (GPU)


def partition_run(cfg: Config, run: RunLayout) -> dict:
    """The partition stage of a run with the run's config (RUN/routers score RUN/data into RUN/partition)."""
    return partition(job_for(cfg, run.routers, run.data, run.partition))


def job_for(cfg: Config, routers_dir: Path, data_dir: Path, out_dir: Path, **overrides) -> PartitionJob:
    rc = cfg.routing
    job = PartitionJob(Path(routers_dir), Path(data_dir), Path(out_dir), None, rc.partition_chunk,
                       rc.score_batch_size, rc.train.device, rc.compile, rc.score_workers, rc.partition_part_chunks,
                       rc.train.dtype)
    return dataclasses.replace(job, **{k: v for k, v in overrides.items() if v is not None})


def partition(job: PartitionJob, chunks: tuple[int, int] | None = None, merge: bool | None = None) -> dict:
    """Score and assign chunks [I, J) (default: every chunk not in a finished part), then merge (default:
    only when no range was given; separate part jobs leave the merge to one `merge_partition`).
    Returns the final manifest, or the last part's."""
    keep_freed_memory()  # tiny routers free and re-ask multi-MB activations every op (host_memory.py)
    merge = chunks is None if merge is None else merge
    data = SplitData(job.data_dir, "train")
    settings = _settings(job, read_manifest(job.routers_dir, "run `smalltalk routers train` first"), data)
    files, total = PartitionFiles(job.out_dir), data.order().num_chunks(settings["chunk_size"])
    todo = ([chunks] if chunks[0] < chunks[1] else []) if chunks else _gaps(files.part_ranges(), total,
                                                                            job.part_chunks)
    result = None
    dist = init_distributed(resolve_device(job.device).type)
    if todo:
        device = resolve_device(job.device, dist.local_rank)
        router = load_routers(job.routers_dir, str(device), job.batch_size, job.compile, job.workers, job.dtype)
        for start, stop in todo:
            result = run_part(job, settings, data, router, start, stop, dist, device)
    if merge and dist.is_main:
        result = merge_partition(job)
    return result or {}


def merge_partition(job: PartitionJob) -> dict:
    """The final shares from the finished parts; an error naming the missing chunks if they do not tile."""
    data = SplitData(job.data_dir, "train")
    settings = _settings(job, read_manifest(job.routers_dir, "run `smalltalk routers train` first"), data)
    files, total = PartitionFiles(job.out_dir), data.order().num_chunks(settings["chunk_size"])
    if not files.covered(total):
        raise SmalltalkError(f"cannot merge: the finished parts {files.part_ranges()} do not cover chunks 0:{total}",
                             where=str(files.parts), fix="run the missing --chunks ranges first")
    return merge_parts(job, settings, data)


def chunk_range(job: PartitionJob, part: int, parts: int) -> tuple[int, int]:
    """Chunks [I, J) of part `part` of `parts` equal parts (for `--part K/P` and SLURM arrays)."""
    if not 0 <= part < parts:
        raise SmalltalkError(f"--part {part}/{parts}: K must be in 0..{parts - 1}")
    data = SplitData(job.data_dir, "train")
    total = data.order().num_chunks(min(job.chunk_size or len(data), len(data)))
    return part * total // parts, (part + 1) * total // parts



def _settings(job: PartitionJob, routers_manifest: dict, data: SplitData) -> dict:
    """What every part of one partition must agree on."""
    prefix = job.prefix or routers_manifest["prefix"]
    if not 2 <= prefix <= data.seq_len:
        raise SmalltalkError(f"prefix={prefix} must be in [2, seq_len={data.seq_len}]")
    return {"method": routers_manifest["method"], "experts": routers_manifest["experts"], "prefix": prefix,
            "sequences": len(data), "chunk_size": min(job.chunk_size or len(data), len(data)),
            "order": data.manifest.get("order"), "dtype": job.dtype,
            "routers_sha256": routers_checksum(Path(job.routers_dir)),
            "data_sha256": data.manifest["splits"]["train"]["sha256"]}


def _gaps(done: list[tuple[int, int]], total: int, step: int) -> list[tuple[int, int]]:
    """Chunk ranges not covered by finished parts, cut into parts of at most `step` chunks."""
    todo, pos = [], 0
    for start, stop in [*done, (total, total)]:
        while pos < start:
            todo.append((pos, min(start, pos + step)))
            pos = todo[-1][1]
        pos = max(pos, stop)
    return todo


def score_chunk(router, data: SplitData, ids: np.ndarray, prefix: int, batch_size: int, dist: DistContext,
                device: torch.device) -> np.ndarray:
    """[len(ids), E] scores; under torchrun rank r scores batches r, r+W, ... and the ranks all-gather."""
    batches = [ids[s:s + batch_size] for s in range(0, len(ids), batch_size)]
    if not dist.enabled:
        return score_split(router, data, ids, prefix, batch_size)
    per_rank = math.ceil(len(batches) / dist.world_size)
    mine = torch.zeros(per_rank * batch_size, router.num_experts, dtype=torch.float32)
    for slot, b in enumerate(range(dist.rank, len(batches), dist.world_size)):
        block = torch.from_numpy(score_split(router, data, batches[b], prefix, batch_size))
        mine[slot * batch_size:slot * batch_size + len(block)] = block
    comm = device if device.type == "cuda" else torch.device("cpu")  # nccl moves CUDA tensors only
    gathered = [torch.empty_like(mine, device=comm) for _ in range(dist.world_size)]
    torch.distributed.all_gather(gathered, mine.to(comm))
    out = np.empty((len(ids), router.num_experts), dtype=np.float32)
    for b, batch in enumerate(batches):
        rank, slot = b % dist.world_size, b // dist.world_size
        out[b * batch_size:b * batch_size + len(batch)] = gathered[rank][
            slot * batch_size:slot * batch_size + len(batch)].cpu().numpy()
    return out


def run_part(job: PartitionJob, settings: dict, data: SplitData, router, start: int, stop: int,
             dist: DistContext, device: torch.device) -> dict:
    """Chunks [start, stop) -> OUT.parts/START-STOP/ (rank 0 writes; every rank scores)."""
    experts, size = settings["experts"], settings["chunk_size"]
    total = data.order().num_chunks(size)
    if not 0 <= start < stop <= total:
        raise SmalltalkError(f"chunks {start}:{stop} are outside 0:{total} ({total} chunks of {size} sequences)",
                             fix=f"pass --chunks I:J with 0 <= I < J <= {total}")
    for a, b in PartitionFiles(job.out_dir).part_ranges():
        if a < stop and start < b and (a, b) != (start, stop):
            raise SmalltalkError(f"chunks {start}:{stop} overlap the finished part {a}:{b}",
                                 where=str(PartitionFiles(job.out_dir).parts), fix="partition the gaps only")
    target = PartitionFiles(job.out_dir).part(start, stop)
    if manifest_of(target).is_file():
        _check_settings(read_json(manifest_of(target)), settings, target)
        return read_json(manifest_of(target))
    started, order, stats = time.perf_counter(), data.order(), []
    domains = len(data.domain_names) if data.has_domains else 0
    with atomic_dir(target) if dist.is_main else contextlib.nullcontext() as tmp:  # other ranks write nothing
        outputs = [open(PartitionFiles.part_ids(tmp, e), "wb") if tmp else None for e in range(experts)]  # noqa: SIM115
        for c in range(start, stop):
            ids = order.chunk(c, size)
            scores = score_chunk(router, data, ids, settings["prefix"], job.batch_size, dist, device)
            if not dist.is_main:
                continue
            check_finite(scores, ids)  # names the router and the sequence id
            assignment = balanced_assignment(scores, first=c % experts)
            stats.append(_chunk_stats(c, ids, scores, assignment, data.seq_domains[ids], experts, domains))
            for e, handle in enumerate(outputs):
                ids[assignment == e].astype(np.int64).tofile(handle)
            data.release()  # the label pages this chunk read (data.batch drops the token pages itself)
            return_free_memory()
        for handle in outputs:
            if handle:
                handle.close()
        if tmp:
            write_json(manifest_of(tmp), {"kind": "partition-part", "chunks": [start, stop], **settings,
                                          "chunk_stats": stats, "seconds": round(time.perf_counter() - started, 3)})
    dist.barrier()
    return read_json(manifest_of(target))


def _chunk_stats(index: int, ids: np.ndarray, scores: np.ndarray, assignment: np.ndarray, labels: np.ndarray,
                 experts: int, domains: int) -> dict:
    """Everything the manifest needs from one chunk, as sums (so chunks add up exactly, in order)."""
    loads = np.bincount(assignment, minlength=experts)
    if not np.array_equal(loads, capacities(len(ids), experts, index % experts)):
        raise SmalltalkError(f"partition invariant broken: loads {loads.tolist()} in chunk {index}")
    best = scores.max(axis=1).astype(np.float64)
    top2 = np.sort(scores, axis=1)[:, -2:].astype(np.float64) if experts > 1 else np.zeros((len(ids), 2))
    argmax = argmax_assignment(scores)
    wide = ids.astype(np.uint64)
    return {"chunk": index, "sequences": len(ids), "loads": loads.tolist(), "best_sum": float(best.sum()),
            "best_sumsq": float((best ** 2).sum()), "margin_sum": float((top2[:, 1] - top2[:, 0]).sum()),
            "argmax_loads": np.bincount(argmax, minlength=experts).tolist(),
            "moved": int((argmax != assignment).sum()), "id_sum": int(wide.sum()),
            "id_sumsq": int((wide * wide).sum()),  # both mod 2^64: a checksum of "each id exactly once"
            "table": contingency(assignment, labels, experts, domains).tolist() if domains else None}


def _check_settings(found: dict, settings: dict, where: Path) -> None:
    differ = [k for k in settings if found.get(k) != settings[k]]
    if differ:
        raise SmalltalkError(f"{where} was made with other settings ({', '.join(differ)})",
                             fix=f"delete {where.parent} to partition again with these routers and data")


def merge_parts(job: PartitionJob, settings: dict, data: SplitData) -> dict:
    """Concatenate the parts in chunk order into OUT/expert_NN.npy, sum their statistics, verify that every
    sequence is there exactly once, then drop the parts."""
    files, experts, n = PartitionFiles(job.out_dir), settings["experts"], settings["sequences"]
    parts = [files.part(a, b) for a, b in files.part_ranges()]
    manifests = [read_json(manifest_of(p)) for p in parts]
    for part, found in zip(parts, manifests, strict=True):
        _check_settings(found, settings, part)
    stats = [row for m in manifests for row in m["chunk_stats"]]
    counts = np.sum([row["loads"] for row in stats], axis=0).astype(np.int64)
    _check_exactly_once(stats, n)
    with atomic_dir(job.out_dir) as tmp:
        for e in range(experts):
            out = np.lib.format.open_memmap(PartitionFiles(tmp).share(e), mode="w+", dtype=np.int64,
                                            shape=(int(counts[e]),))
            pos = 0
            for part in parts:
                path = PartitionFiles.part_ids(part, e)
                ids = np.memmap(path, dtype=np.int64, mode="r") if path.stat().st_size else np.zeros(0, np.int64)
                for s in range(0, len(ids), _COPY_BLOCK):  # block by block: memory O(block), not O(share)
                    block = ids[s:s + _COPY_BLOCK]
                    out[pos:pos + len(block)] = block
                    pos += len(block)
                del ids
            out.flush()
            del out
        manifest = _final_manifest(settings, stats, counts, data)
        manifest.update(routers=str(Path(job.routers_dir).resolve()), data=str(Path(job.data_dir).resolve()))
        manifest["sha256"] = {f: sha256_file(tmp / f) for f in manifest["files"]}
        manifest["seconds"] = round(sum(m["seconds"] for m in manifests), 3)
        write_json(manifest_of(tmp), manifest)
    remove_tree(files.parts)
    return manifest


def _check_exactly_once(stats: list[dict], n: int) -> None:
    mask = (1 << 64) - 1
    if sum(row["sequences"] for row in stats) != n or \
            sum(row["id_sum"] for row in stats) & mask != (n * (n - 1) // 2) & mask or \
            sum(row["id_sumsq"] for row in stats) & mask != ((n - 1) * n * (2 * n - 1) // 6) & mask:
        raise SmalltalkError("partition invariant broken: the parts do not hold every sequence exactly once",
                             fix="delete the partition's .parts directory and partition again")


def _final_manifest(settings: dict, stats: list[dict], counts: np.ndarray, data: SplitData) -> dict:
    n, experts = settings["sequences"], settings["experts"]
    mean = sum(row["best_sum"] for row in stats) / n
    var = max(sum(row["best_sumsq"] for row in stats) / n - mean ** 2, 0.0)
    tables = [row["table"] for row in stats if row["table"] is not None]
    table = np.sum(tables, axis=0) if tables else None
    return {
        "kind": "partition", **settings, "chunks": len(stats), "counts": counts.tolist(),
        "score_stats": {"best_mean": mean, "best_std": math.sqrt(var),
                        "margin_mean": sum(row["margin_sum"] for row in stats) / n,
                        "argmax_loads": np.sum([r["argmax_loads"] for r in stats], axis=0).tolist(),
                        "moved_by_balancing": sum(row["moved"] for row in stats) / n},
        "domain_mix": mix_from_table(table, data.domain_names) if table is not None else None,
        **({"quality": quality_from_table(table)} if table is not None else {}),
        "files": [PartitionFiles.share_name(e) for e in range(experts)],
    }


def load_share(partition_dir: Path, expert: int) -> np.ndarray:
    """Expert `expert`'s training sequence ids (in chunk order), memory-mapped."""
    path = PartitionFiles(Path(partition_dir)).share(expert)
    if not path.is_file():
        raise SmalltalkError(f"missing {path}", fix="run `smalltalk partition` first")
    return np.load(path, mmap_mode="r")
