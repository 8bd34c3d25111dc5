"""Elastic experts: add a router + expert pair for new documents, or drop a pair, without touching others.

Routing is argmax over independent router likelihoods (uniform prior), so a new pair needs no retraining
of the existing ones: the new router only has to give its own domain a higher prefix likelihood than the
old routers do, and other text a lower one. That relies on the routers being comparably calibrated
density models — same architecture, tokenizer, prefix length and training budget — which is why the new
router reuses the run's router spec and trains for as many steps as each EM router did in total.
`mixture.json` is the only file edited (atomically, after both models are trained), so an interrupted
`add` leaves the mixture as it was and a rerun resumes from the pair's checkpoints.

Count-based n-gram routers (routing.method=ngram) are elastic the same way: a router of the mixture is a row
of the run's count tables, written once to its own directory (RUN/routers/NN/model, new files beside the
unchanged tables); the new router counts its documents' prefixes and is scaled to the mean counted weight of
the others, so that the Dirichlet prior weighs the same against each (their calibration, as the training
budget is the router LMs').
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import time
from pathlib import Path

import numpy as np
import torch

from smalltalk.config import Config
from smalltalk.data.ingest import resolve_inputs
from smalltalk.data.prepare import prepare_data
from smalltalk.data.shards import SplitData
from smalltalk.errors import SmalltalkError
from smalltalk.experts.start import expert_spec, expert_train_config, start_model
from smalltalk.fsutil import read_json, remove_tree, sha256_file, write_json
from smalltalk.layout import RouterFiles, RunLayout, TrainFiles, manifest_of
from smalltalk.llama import ModelSpec
from smalltalk.mixture.model import SmallTalkMixture
from smalltalk.routing.assignment import argmax_assignment
from smalltalk.routing.ngram import NgramRouters
from smalltalk.routing.routers import load_router_dirs, score_split
from smalltalk.training.nll import token_nll
from smalltalk.training.trainer import TrainJob, train

ELASTIC_METHODS = ("em", "ngram")  # one router per expert, each a density model of its share


def read_mixture(run: RunLayout) -> dict:
    """mixture.json with `router_dirs` filled in (one router per expert, in order) for EM and n-gram routers
    (an n-gram mixture's rows are written to their own directories the first time: new files)."""
    manifest = run.mixture()
    if "router_dirs" not in manifest and manifest["method"] == "em":
        routers = run.mixture_routers()  # refined ones, if the mixture routes with them
        manifest["router_dirs"] = [run.router_model_rel(name, routers) for name in run.routers_manifest()["routers"]]
    elif "router_dirs" not in manifest and manifest["method"] == "ngram":
        manifest["router_dirs"] = _ngram_router_dirs(run, run.mixture_routers(), manifest["experts"])
    return manifest


def _ngram_router_dirs(run: RunLayout, routers: Path, experts: int) -> list[str]:
    """Each row of the n-gram routers' tables as a router of its own (RUN/routers/NN/model), written once."""
    tables, dirs = None, []
    for e in range(experts):
        rel = run.router_model_rel(f"{e:02d}", routers)
        if not manifest_of(run.root / rel).is_file():
            tables = tables or NgramRouters.load(routers)
            tables.row(e).save(run.root / rel, {"kind": "routers", "method": "ngram", "row_of": str(
                routers.relative_to(run.root)), "row": e})
        dirs.append(rel)
    return dirs


def _elastic_method(run: RunLayout, verb: str) -> str:
    """The mixture's routing method, refused unless it has one router per expert (before anything is written)."""
    method = run.mixture()["method"]
    if method not in ELASTIC_METHODS:
        raise SmalltalkError(f"`experts {verb}` needs one router per expert; this mixture routes by {method!r}",
                             fix="elastic experts rely on EM routers (routing.method: em or ngram)")
    return method


def _count_router(run: RunLayout, manifest: dict, data: SplitData, pair: int, prefix: int) -> dict:
    """The new pair's n-gram router: its documents' prefixes counted, scaled to the mixture's routers' mean
    counted weight (written atomically; a rerun finds it done)."""
    router_dir = RouterFiles(run.routers).router(f"{pair:02d}").model
    if not manifest_of(router_dir).is_file():
        routers = load_router_dirs("ngram", [run.root / rel for rel in manifest["router_dirs"]])
        new = NgramRouters(*(np.zeros((1, getattr(routers, name).shape[1]), np.float32)
                             for name in ("pairs", "contexts", "unigrams")), routers.order, routers.prior)
        ids = np.arange(len(data))
        for start in range(0, len(ids), 4096):
            new.count(0, data.batch(ids[start:start + 4096], prefix))
        factor = float(routers.mass().mean() / new.mass()[0])
        new.scale(factor)
        new.save(router_dir, {"kind": "routers", "method": "ngram", "pair": pair, "counted_sequences": len(ids),
                              "scaled_by": factor})
    return read_json(manifest_of(router_dir))


def inputs_checksum(inputs: list[str]) -> str:
    """sha256 over the input files' contents (sorted by path): the identity of an `experts add`."""
    digest = hashlib.sha256()
    for path in resolve_inputs(list(inputs)):
        digest.update(sha256_file(path).encode() if path.is_file() else str(path).encode())
    return digest.hexdigest()


def _free_index(run: RunLayout) -> int:
    """The next pair number with neither experts/NN nor routers/NN on disk (removed pairs keep theirs)."""
    k = 0
    while run.expert(k).exists() or RouterFiles(run.routers).router(f"{k:02d}").root.exists() \
            or run.added(k).parent.exists():
        k += 1
    return k


def add_expert(cfg: Config, run: RunLayout, inputs: list[str], expert_steps: int | None = None,
               router_steps: int | None = None) -> dict:
    """Prepare `inputs` with the run's tokenizer, train one router and one expert on them, append the pair."""
    method = _elastic_method(run, "add")
    if method == "ngram" and router_steps:
        raise SmalltalkError(f"--router-steps {router_steps} with n-gram routers: they count their documents, "
                             "they do not train", fix="leave --router-steps out")
    manifest = read_mixture(run)
    checksum = inputs_checksum(inputs)
    current = set(manifest["expert_dirs"])
    for op in manifest.get("elastic", []):
        if op["op"] == "add" and op.get("inputs_sha256") == checksum and run.expert_model_rel(op["pair"]) in current:
            raise SmalltalkError(f"these documents were already added as pair {op['pair']:02d}",
                                 fix="nothing to do; to retrain it, `smalltalk experts remove` it first")
    pending = run.pending_adds()
    if pending and pending[0]["inputs_sha256"] != checksum:
        raise SmalltalkError(f"an unfinished `experts add` of {pending[0]['inputs']} is under way",
                             where=str(run.pending_add(pending[0]["index"])),
                             fix="rerun it with the same --data to finish it, or delete that pair's added/NN directory")
    k = pending[0]["index"] if pending else _free_index(run)
    write_json(run.pending_add(k), {"index": k, "inputs": [str(i) for i in inputs], "inputs_sha256": checksum})
    pair_data = run.added(k)
    if not manifest_of(pair_data).is_file():
        data_cfg = copy.deepcopy(cfg)
        data_cfg.data.inputs = list(inputs)
        prepare_data(data_cfg, run.tokenizer, pair_data)
    data, val = SplitData(pair_data, "train"), SplitData(pair_data, "validation")
    if len(data) == 0:
        raise SmalltalkError(f"no training sequences in {inputs}", fix="add more documents")

    if method == "ngram":
        router = _count_router(run, manifest, data, k, run.prefix())
    else:
        router = _train_router(cfg, run, data, k, router_steps)
    expert_cfg = expert_train_config(cfg, k)  # branched from where the others started (experts/start.py)
    expert_cfg = dataclasses.replace(expert_cfg, steps=expert_steps or expert_cfg.steps)
    expert = train(TrainJob(expert_spec(cfg, data.vocab_size), expert_cfg, data, run.expert(k),
                            val=val if len(val) else None, name=f"expert {k:02d}", init_from=start_model(cfg, run)),
                   resume=True)

    manifest["router_dirs"] = [*manifest["router_dirs"], run.router_model_rel(f"{k:02d}")]
    manifest["expert_dirs"] = [*manifest["expert_dirs"], run.expert_model_rel(k)]
    manifest["experts"] = len(manifest["expert_dirs"])
    router_record = ({"router_counted_sequences": router["counted_sequences"], "router_scaled_by": router["scaled_by"]}
                     if method == "ngram" else {"router_steps": router["steps"]})
    manifest.setdefault("elastic", []).append({
        "op": "add", "pair": k, "data": str(pair_data.relative_to(run.root)), "inputs": [str(Path(i)) for i in inputs],
        "inputs_sha256": checksum, **router_record, "expert_steps": expert["steps"], "time": time.time()})
    write_json(run.mixture_file, manifest)  # the one edit, once both models are trained
    run.pending_add(k).unlink()
    return {"pair": k, "index": manifest["experts"] - 1, "router": router, "expert": expert,
            "train_sequences": len(data), "manifest": manifest}


def _train_router(cfg: Config, run: RunLayout, data: SplitData, k: int, router_steps: int | None) -> dict:
    """The new pair's router LM: the run's router spec, prefix and optimizer, trained on its documents."""
    rc, prefix, routers_manifest = cfg.routing, run.prefix(), run.routers_manifest()
    # as many steps as each EM router trained in all its rounds (its own manifest: the M-step's length is
    # routing.share_passes's, which may differ from routing.train.steps)
    steps = router_steps or TrainFiles(RouterFiles(run.routers).router(routers_manifest["routers"][0]).root
                                       ).summary()["steps"]
    router_cfg = dataclasses.replace(rc.train, seq_len=prefix, steps=steps, schedule_steps=steps,
                                     seed=rc.seed + k, progress=False)
    router_spec = ModelSpec(**routers_manifest["router_spec"])
    router_dir = RouterFiles(run.routers).router(f"{k:02d}").root
    return train(TrainJob(router_spec, router_cfg, data, router_dir, name=f"router {k:02d}"), resume=True)


def remove_expert(run: RunLayout, index: int, delete: bool = False) -> dict:
    """Drop mixture expert `index` (its position in mixture.json) and its router. The files stay on disk
    unless `delete` (so a removal can be undone by editing mixture.json)."""
    _elastic_method(run, "remove")
    manifest = read_mixture(run)
    count = len(manifest["expert_dirs"])
    if not 0 <= index < count:
        raise SmalltalkError(f"expert {index} does not exist: the mixture has experts 0..{count - 1}")
    if count <= 1:
        raise SmalltalkError("cannot remove the last expert of a mixture")
    expert_dir, router_dir = manifest["expert_dirs"][index], manifest["router_dirs"][index]
    doomed = [run.inside(rel, "a directory to delete").parent for rel in (expert_dir, router_dir)]
    if delete and any(d.resolve() == run.root.resolve() for d in doomed):
        raise SmalltalkError(f"--delete would remove the whole run: {expert_dir!r} or {router_dir!r} is not a "
                             "pair's own directory", where=str(run.mixture_file))
    manifest = {**manifest, "expert_dirs": [d for i, d in enumerate(manifest["expert_dirs"]) if i != index],
                "router_dirs": [d for i, d in enumerate(manifest["router_dirs"]) if i != index]}
    manifest["experts"] = count - 1
    manifest.setdefault("elastic", []).append({"op": "remove", "expert_dir": expert_dir, "router_dir": router_dir,
                                               "deleted": delete, "time": time.time()})
    write_json(run.mixture_file, manifest)
    if delete:
        for directory in doomed:
            remove_tree(directory)
    return {"removed": index, "expert_dir": expert_dir, "router_dir": router_dir, "manifest": manifest}


def routing_shift(root: Path, before: dict, after: dict, data: SplitData, ids: np.ndarray,
                  prefix: int) -> dict:
    """How routing of `ids` changes between two mixture manifests of one run: the share whose expert
    (compared by directory, not index) changed, and where they went."""
    chosen = {}
    for name, manifest in (("before", before), ("after", after)):
        mixture = SmallTalkMixture(root, manifest)
        picks = argmax_assignment(score_split(mixture.routers, data, ids, prefix))
        chosen[name] = np.array(manifest["expert_dirs"])[picks]
    changed = chosen["before"] != chosen["after"]
    return {"sequences": len(ids), "changed": float(changed.mean()), "chosen_before": chosen["before"],
            "chosen_after": chosen["after"]}


def compare_mixtures(root: Path, before: dict, after: dict, data: SplitData, ids: np.ndarray, prefix: int,
                     batch_size: int = 64) -> dict:
    """Routing shift plus perplexity (after the prefix, and all tokens) of `ids` under both manifests; each
    expert scores once the rows routed to it on either side."""
    from transformers import AutoModelForCausalLM

    shift = routing_shift(root, before, after, data, ids, prefix)
    nll_by = {name: np.empty((len(ids), data.seq_len - 1)) for name in ("before", "after")}
    for rel in np.union1d(shift["chosen_before"], shift["chosen_after"]):
        rows = np.flatnonzero((shift["chosen_before"] == rel) | (shift["chosen_after"] == rel))
        model = AutoModelForCausalLM.from_pretrained(str(root / rel)).eval()
        with torch.inference_mode():
            for start in range(0, len(rows), batch_size):
                part = rows[start:start + batch_size]
                nll_part = token_nll(model, torch.from_numpy(data.batch(ids[part]))).numpy()
                for name in ("before", "after"):  # a row routed to `rel` on either side
                    hit = shift[f"chosen_{name}"][part] == rel
                    nll_by[name][part[hit]] = nll_part[hit]
    out = {"sequences": len(ids), "changed": shift["changed"]}
    for name in ("before", "after"):
        rows = nll_by[name]
        chosen = shift[f"chosen_{name}"]
        out[name] = {"ppl_after": math.exp(rows[:, prefix - 1:].mean()), "ppl_all": math.exp(rows.mean()),
                     "loads": {str(k): int(v) for k, v in zip(*np.unique(chosen, return_counts=True), strict=True)}}
    return out
