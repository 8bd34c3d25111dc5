"""EM training of the routers (the paper's Algorithm 1): router LMs, or count-based n-gram routers.

Round 0 splits a first chunk of N sequences at random into E equal shares. In every round each router
trains on its share with next-token loss on the first M tokens only (an independent job; one optimizer
per router, carried across rounds through its checkpoint); then a fresh chunk is scored by all routers
and re-split by balanced assignment. State is written at round boundaries, so a killed run resumes.
"""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from smalltalk.config import ADDED_LATER, Config
from smalltalk.data.order import ChunkStream
from smalltalk.data.shards import SplitData
from smalltalk.errors import SmalltalkError
from smalltalk.fsutil import atomic_dir, atomic_file, read_json, write_json
from smalltalk.host import threads_per_job
from smalltalk.layout import RouterFiles, manifest_of
from smalltalk.llama import ModelSpec, resolve_spec
from smalltalk.routing.assignment import argmax_assignment, balanced_assignment, check_finite
from smalltalk.routing.metrics import split_quality
from smalltalk.routing.ngram import NgramRouters
from smalltalk.routing.routers import LMRouters, score_split
from smalltalk.routing.scoring import score_batches


def router_names(experts: int) -> list[str]:
    return [f"{e:02d}" for e in range(experts)]


def _train_router(args: tuple) -> dict:
    """One router's job for one round (runs in this process or a worker process)."""
    spec, train_cfg, data_dir, out_dir, ids, name, threads = args
    import torch

    from smalltalk.training.trainer import TrainJob, train

    if threads:
        torch.set_num_threads(threads)
    return train(TrainJob(spec, train_cfg, SplitData(data_dir, "train"), Path(out_dir), ids, name=name),
                 resume=True)


def _settings(cfg: Config, spec: ModelSpec, data: SplitData) -> dict:
    rc = cfg.routing
    levers = {k: getattr(rc, k) for k, old in ADDED_LATER["routing"].items() if getattr(rc, k) != old}
    return {"experts": rc.experts, "prefix": rc.prefix, "rounds": rc.rounds, "chunk": rc.chunk, "seed": rc.seed,
            "router": dataclasses.asdict(spec), "train": _train_settings(rc.train), **levers,
            "data_sha256": data.manifest["splits"]["train"]["sha256"]}


def _train_settings(train_cfg) -> dict:
    """routing.train as EM's state records it; the forward path (how fast, not what) is left out, so EM
    state written before `forward` existed still resumes."""
    return {k: v for k, v in dataclasses.asdict(train_cfg).items() if k != "forward"}


def train_em_routers(cfg: Config, data_dir: Path, out_dir: Path) -> dict:
    """Run (or resume) EM; returns the manifest written to out_dir."""
    rc = cfg.routing
    data, val = SplitData(data_dir, "train"), SplitData(data_dir, "validation")
    if not 2 <= rc.prefix <= data.seq_len:
        raise SmalltalkError(f"routing.prefix={rc.prefix} must be in [2, seq_len={data.seq_len}]")
    if rc.experts < 2:
        raise SmalltalkError(f"routing.experts={rc.experts}: a mixture needs at least 2 experts")
    spec = resolve_spec(rc.router, data.vocab_size)
    settings = _settings(cfg, spec, data)
    files = RouterFiles(out_dir)
    state_path = files.em_state
    if state_path.exists() and read_json(state_path)["settings"] != settings:
        raise SmalltalkError(f"{out_dir} holds EM routers trained with other settings",
                             fix="use a new --out directory, or delete it to start over")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(state_path, {"settings": settings})
    stream = ChunkStream(data, rc.chunk)
    history_path = files.em_history
    history = read_json(history_path)["rounds"] if history_path.exists() else []
    heldout = val.sample(rc.heldout_sequences)
    names = router_names(rc.experts)
    for r in range(len(history), rc.rounds):
        chunk_ids, assignment, epoch = _share(cfg, data_dir, out_dir, stream, r)
        summaries = _run_round(cfg, spec, data_dir, out_dir, chunk_ids, assignment, r, names)
        routers = LMRouters.from_model_dirs([files.router(name).model for name in names], rc.train.device,
                                            rc.score_batch_size, workers=rc.score_workers, dtype=rc.train.dtype)
        row = _round_metrics(r, epoch, routers, data, val, heldout, chunk_ids, assignment, summaries,
                             rc.prefix, out_dir)
        if r + 1 < rc.rounds:
            next_ids, next_epoch = stream.chunk(r + 1)
            scores = score_split(routers, data, next_ids, rc.prefix, rc.score_batch_size)
            check_finite(scores, next_ids)
            next_assignment = balanced_assignment(scores)
            with atomic_file(files.round_share(r + 1)) as tmp:
                np.savez(tmp, ids=next_ids, assignment=next_assignment)
            row["next_chunk"] = {"epoch": next_epoch, "argmax_loads": np.bincount(
                argmax_assignment(scores), minlength=rc.experts).tolist(),
                **_quality(next_assignment, data.seq_domains[next_ids], "balanced")}
        history.append(row)
        write_json(history_path, {"settings": settings, "rounds": history})
    manifest = {"kind": "routers", "method": "em", "experts": rc.experts, "prefix": rc.prefix,
                "routers": names, "router_spec": dataclasses.asdict(spec), "rounds": rc.rounds,
                "chunk": rc.chunk, "seed": rc.seed, "data": str(Path(data_dir).resolve()),
                "data_sha256": settings["data_sha256"], "tokenizer_dir": data.manifest.get("tokenizer_dir")}
    write_json(manifest_of(out_dir), manifest)
    return manifest


def _share(cfg: Config, data_dir: Path, out_dir: Path, stream: ChunkStream, r: int):
    """The ids and assignment router training uses in round r (round 0: an equal random split, or the
    tf-idf warm start)."""
    path = RouterFiles(out_dir).round_share(r)
    ids, epoch = stream.chunk(r)
    if path.exists():
        saved = np.load(path)
        return saved["ids"], saved["assignment"], epoch
    if r != 0:
        raise SmalltalkError(f"missing EM state {path}", fix=f"delete {out_dir} and train the routers again")
    rc = cfg.routing
    if rc.init_split == "tfidf":
        assignment = _tfidf_split(cfg, data_dir, out_dir, stream.data, ids)
    else:
        assignment = np.random.default_rng([rc.seed, 12345]).permutation(len(ids)) % rc.experts
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        np.savez(tmp, ids=ids, assignment=assignment)
    return ids, assignment, epoch


def _tfidf_split(cfg: Config, data_dir: Path, out_dir: Path, data: SplitData, ids: np.ndarray) -> np.ndarray:
    """Round 0 from balanced k-means over tf-idf of the prefixes (c-BTM's clustering), kept beside the routers."""
    from smalltalk.routing.baselines import train_tfidf_router
    from smalltalk.routing.routers import load_routers

    warm = RouterFiles(out_dir).warm_start
    if not manifest_of(warm).is_file():
        train_tfidf_router(cfg, data_dir, warm)
    scores = score_split(load_routers(warm), data, ids, cfg.routing.prefix)
    return balanced_assignment(scores)


def _run_round(cfg: Config, spec: ModelSpec, data_dir: Path, out_dir: Path, chunk_ids: np.ndarray,
               assignment: np.ndarray, r: int, names: list[str]) -> list[dict]:
    rc = cfg.routing
    steps = rc.steps_per_round()
    train_cfg = dataclasses.replace(rc.train, seq_len=rc.prefix, steps=(r + 1) * steps,
                                    schedule_steps=rc.rounds * steps, progress=False)
    distinct = rc.router_init == "distinct"  # else every router starts from the same weights
    threads = threads_per_job(rc.parallel) if rc.parallel > 1 else rc.train.num_threads
    jobs = [(spec, dataclasses.replace(train_cfg, seed=train_cfg.seed + e) if distinct else train_cfg, str(data_dir),
             str(RouterFiles(out_dir).router(name).root), chunk_ids[assignment == e], f"router {name} round {r}",
             threads) for e, name in enumerate(names)]
    if rc.parallel <= 1:
        return [_train_router(job) for job in jobs]
    with ProcessPoolExecutor(rc.parallel, mp_context=get_context("spawn")) as pool:
        return list(pool.map(_train_router, jobs))


def _quality(assignment: np.ndarray, labels: np.ndarray, prefix: str) -> dict:
    return {f"{prefix}_{k}": v for k, v in split_quality(assignment, labels).items()}


def _round_metrics(r: int, epoch: int, routers: LMRouters, data: SplitData, val: SplitData,
                   heldout: np.ndarray, chunk_ids: np.ndarray, assignment: np.ndarray, summaries: list[dict],
                   prefix: int, out_dir: Path) -> dict:
    experts = routers.num_experts
    tokens = prefix - 1
    share_loss = []  # each router scores only its own share: E x cheaper than scoring the whole chunk
    for e, model in enumerate(routers.models):
        own = chunk_ids[assignment == e]
        own_scores = score_batches([model], lambda rows: data.batch(rows, prefix), own, routers.batch_size,
                                   routers.device)
        share_loss.append(float(-own_scores.mean() / tokens))
    row = {"round": r, "epoch": epoch, "loads": np.bincount(assignment, minlength=experts).tolist(),
           "train_loss": [s["final_loss"] for s in summaries], "share_loss": share_loss,
           **_quality(assignment, data.seq_domains[chunk_ids], "share")}
    if len(heldout):
        scores = score_split(routers, val, heldout, prefix)
        best = argmax_assignment(scores)
        best_path, previous = RouterFiles(out_dir).heldout_best(r), RouterFiles(out_dir).heldout_best(r - 1)
        with atomic_file(best_path) as tmp:
            np.save(tmp, best)
        row.update({
            "heldout_loss": [float(-scores[:, e].mean() / tokens) for e in range(experts)],
            "heldout_routed_loss": float(-scores.max(axis=1).mean() / tokens),
            "heldout_argmax_loads": np.bincount(best, minlength=experts).tolist(),
            "best_changed_fraction": float((np.load(previous) != best).mean()) if previous.exists() else None,
            **_quality(best, val.seq_domains[heldout], "heldout")})
    print(json.dumps({k: row[k] for k in ("round", "loads", "share_nmi") if k in row}
                     | {"heldout_nmi": row.get("heldout_nmi")}), flush=True)
    return row


def train_ngram_routers(cfg: Config, data_dir: Path, out_dir: Path) -> dict:
    """The paper's EM with count-based n-gram routers (routing/ngram.py): seconds of CPU, no model FLOPs.
    Written whole (atomic) at the end."""
    rc = cfg.routing
    data, val = SplitData(data_dir, "train"), SplitData(data_dir, "validation")
    prior = float(data.vocab_size if rc.ngram_prior is None else rc.ngram_prior)
    if rc.ngram_order < 1 or prior <= 0 or not 0 <= rc.ngram_decay <= 1 or rc.ngram_buckets < 1024 or \
            rc.ngram_buckets & (rc.ngram_buckets - 1):
        raise SmalltalkError(f"routing.ngram_order={rc.ngram_order}, ngram_prior={rc.ngram_prior}, ngram_decay="
                             f"{rc.ngram_decay}, ngram_buckets={rc.ngram_buckets}",
                             fix="order >= 1, prior > 0, decay in [0, 1], buckets a power of two >= 1024")
    routers = NgramRouters.empty(rc.experts, data.vocab_size, rc.ngram_order, prior, rc.ngram_buckets)
    stream, heldout = ChunkStream(data, rc.chunk), val.sample(rc.heldout_sequences)
    history = []
    with atomic_dir(out_dir) as tmp:
        for r in range(rc.rounds):
            ids, assignment, epoch = _share(cfg, data_dir, tmp, stream, r)
            routers.scale(rc.ngram_decay)
            prefixes = data.batch(ids, rc.prefix)
            for e in range(rc.experts):
                routers.count(e, prefixes[assignment == e])
            row = {"round": r, "epoch": epoch, "loads": np.bincount(assignment, minlength=rc.experts).tolist(),
                   **{f"share_{k}": v for k, v in split_quality(assignment, data.seq_domains[ids]).items()}}
            if len(heldout):
                best = routers.score(val.batch(heldout, rc.prefix)).argmax(axis=1)
                row.update({f"heldout_{k}": v for k, v in split_quality(best, val.seq_domains[heldout]).items()})
            if r + 1 < rc.rounds:
                next_ids, _ = stream.chunk(r + 1)
                scores = routers.score(data.batch(next_ids, rc.prefix))
                check_finite(scores, next_ids)
                with open(RouterFiles(tmp).round_share(r + 1), "wb") as f:
                    np.savez(f, ids=next_ids, assignment=balanced_assignment(scores))
            history.append(row)
            print(json.dumps({k: row.get(k) for k in ("round", "loads", "share_nmi", "heldout_nmi")}), flush=True)
        routers.save(tmp)
        manifest = {"kind": "routers", "method": "ngram", "experts": rc.experts, "prefix": rc.prefix,
                    "order": rc.ngram_order, "prior": prior, "decay": rc.ngram_decay,
                    "buckets": rc.ngram_buckets, "rounds": rc.rounds, "chunk": rc.chunk, "seed": rc.seed,
                    "counted_tokens": int(rc.rounds * min(rc.chunk, len(data)) * rc.prefix),
                    "data": str(Path(data_dir).resolve()), "data_sha256": data.manifest["splits"]["train"]["sha256"],
                    "tokenizer_dir": data.manifest.get("tokenizer_dir")}
        write_json(RouterFiles(tmp).em_history, {"rounds": history})
        write_json(manifest_of(tmp), manifest)
    return manifest
