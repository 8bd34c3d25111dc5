"""Router refinement from the experts: a departure from the paper, off unless refine.sequences > 0.

The paper remarks that the experts could route for themselves; FlexOlmo labels each sequence by the expert
with the lowest loss. After the experts train, a sample of training sequences (drawn by the split's seeded
order) is labelled by the expert whose loss over the whole sequence is lowest, and each router is
fine-tuned on the prefixes labelled with its expert, with the same prefix next-token loss as EM's M-step
(`refine.passes` passes, one optimizer per router: still independent jobs). The partition and the experts
stay as they are; only inference routing changes: mixture.json then names RUN/routers-refined.

Its cost is routing cost: the experts' forward passes over the sample and the fine-tuning count in the
routing FLOPs (experts/budget.py), so the dense model matched in full gets them too. The manifest's
`heldout` figures, on validation sequences: how often the routers' argmax agrees with the experts' own
choice before and after, and the mixture's perplexity routed by each and by the experts' choice (a bound no
router reaches: it reads the whole sequence).
"""

from __future__ import annotations

import dataclasses
import math
import shutil

import numpy as np

from smalltalk.config import Config
from smalltalk.data.shards import SplitData
from smalltalk.errors import SmalltalkError
from smalltalk.flops import forward_flops
from smalltalk.fsutil import atomic_dir, atomic_file, read_json, write_json
from smalltalk.layout import RouterFiles, RunLayout, TrainFiles, manifest_of
from smalltalk.llama import ModelSpec, spec_from_hf
from smalltalk.mixture.model import write_mixture_manifest
from smalltalk.routing.assignment import argmax_assignment
from smalltalk.routing.routers import LMRouters, routers_checksum, score_split
from smalltalk.training.distributed import resolve_device
from smalltalk.training.nll import batch_nll


def expert_nll(expert_dirs: list, data: SplitData, ids: np.ndarray, device, batch_size: int = 64) -> np.ndarray:
    """[len(ids), E] mean per-token NLL of each whole sequence under each expert."""
    from transformers import AutoModelForCausalLM

    out = np.empty((len(ids), len(expert_dirs)), dtype=np.float64)
    for e, path in enumerate(expert_dirs):
        model = AutoModelForCausalLM.from_pretrained(str(path)).to(device).eval()
        for start in range(0, len(ids), batch_size):
            tokens = data.batch(ids[start:start + batch_size])
            nll = np.empty((len(tokens), tokens.shape[1] - 1))
            batch_nll(model, tokens, np.arange(len(tokens)), device, nll)
            out[start:start + len(tokens), e] = nll.mean(axis=1)
    return out


def refine_routers(cfg: Config, run: RunLayout) -> dict:
    """Label, fine-tune, measure; writes RUN/routers-refined (resumable: labels and each router's job are
    kept) and returns its manifest."""
    rf, rc = cfg.refine, cfg.routing
    base = run.routers_manifest()
    if base["method"] != "em":
        raise SmalltalkError(f"refinement fine-tunes router LMs; {run.routers} holds {base['method']} routers",
                             fix="set refine.sequences=0, or train the routers with routing.method=em")
    mixture = run.mixture()
    expert_dirs = [run.inside(rel, "expert_dirs") for rel in mixture["expert_dirs"]]
    out = run.routers_refined
    device = resolve_device(rc.train.device)
    data, val = SplitData(run.data, "train"), SplitData(run.data, "validation")
    ids = data.sample(rf.sequences)
    labels_path = RouterFiles(out).refine_labels
    if labels_path.is_file():
        labels = np.load(labels_path)["labels"]
    else:
        labels = expert_nll(expert_dirs, data, ids, device).argmin(axis=1)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_file(labels_path) as tmp:
            np.savez(tmp, ids=ids, labels=labels)
    spec = ModelSpec(**base["router_spec"])
    prefix = run.prefix()
    summaries = [_fine_tune(cfg, run, spec, data, name, ids[labels == e], prefix)
                 for e, name in enumerate(base["routers"])]
    manifest = {**{k: base[k] for k in ("kind", "method", "experts", "prefix", "routers", "router_spec", "data",
                                         "data_sha256", "tokenizer_dir") if k in base},
                "refined_from": routers_checksum(run.routers),
                "refine": {**dataclasses.asdict(rf), "steps": [s["steps"] for s in summaries],
                           "labelled": np.bincount(labels, minlength=len(expert_dirs)).tolist()},
                "flops": _flops(spec, spec_from_hf(_hf_config(expert_dirs[0])), len(ids), data.seq_len,
                                prefix, len(expert_dirs), summaries),
                "heldout": _heldout(run, expert_dirs, val, rf.heldout_sequences, prefix, device)}
    write_json(manifest_of(out), manifest)
    write_mixture_manifest(run)  # the mixture now routes with the refined routers
    print(f"refine: {len(ids)} sequences relabelled, per expert {manifest['refine']['labelled']}; held-out "
          f"agreement with the experts' choice {_pct(manifest['heldout'], 'before')} -> "
          f"{_pct(manifest['heldout'], 'after')}", flush=True)
    return manifest


def _pct(heldout: dict, when: str) -> str:
    return f"{heldout['agreement_' + when]:.1%}" if heldout else "n/a"


def _hf_config(model_dir):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_dir))


def _fine_tune(cfg: Config, run: RunLayout, spec: ModelSpec, data: SplitData, name: str, ids: np.ndarray,
               prefix: int) -> dict:
    """Router `name` fine-tuned on the first `prefix` tokens of `ids` (its expert's choices), as EM trained
    it (routing.train); with no sequence, a copy of it."""
    from smalltalk.training.trainer import TrainJob, train

    rc, rf = cfg.routing, cfg.refine
    source, target = RouterFiles(run.routers).router(name), RouterFiles(run.routers_refined).router(name)
    batch = rc.train.micro_batch_size * rc.train.grad_accum
    steps = math.ceil(rf.passes * len(ids) / batch)
    if steps == 0:
        if not target.model.is_dir():
            with atomic_dir(target.model) as tmp:
                shutil.copytree(source.model, tmp, dirs_exist_ok=True)
        return {"steps": 0, "training_flops": {"exact": 0.0, "paper": 0.0}}
    train_cfg = dataclasses.replace(rc.train, seq_len=prefix, steps=steps, schedule_steps=None,
                                    lr=rf.lr or rc.train.lr, warmup_steps=min(rc.train.warmup_steps, steps // 10),
                                    progress=False, tensorboard=False)
    return train(TrainJob(spec, train_cfg, data, target.root, ids, name=f"router {name} refine",
                          init_from=source.model), resume=TrainFiles(target.root).checkpoints.exists())


def _flops(router: ModelSpec, expert: ModelSpec, sequences: int, seq_len: int, prefix: int, experts: int,
           summaries: list[dict]) -> dict:
    """Labelling (every expert over every sampled sequence) + fine-tuning (the jobs' own count)."""
    out = {}
    for acc in ("exact", "paper"):
        labelling = sequences * experts * forward_flops(expert, seq_len, 1, acc)
        tuning = sum(s["training_flops"][acc] for s in summaries)
        out[acc] = {"labelling": labelling, "fine_tuning": tuning, "total": labelling + tuning}
    return out


def _heldout(run: RunLayout, expert_dirs: list, val: SplitData, count: int, prefix: int, device) -> dict:
    """Agreement with the experts' own choice and perplexity by each routing, on validation sequences."""
    ids = val.sample(count)
    if not len(ids):
        return {}
    nll = expert_nll(expert_dirs, val, ids, device)
    own = nll.argmin(axis=1)
    rows = np.arange(len(ids))
    out = {"sequences": len(ids), "ppl_experts_choice": math.exp(nll[rows, own].mean())}
    for when, where in (("before", run.routers), ("after", run.routers_refined)):
        routers = LMRouters.from_model_dirs([RouterFiles(where).router(n).model for n in
                                             read_json(manifest_of(run.routers))["routers"]], str(device))
        chosen = argmax_assignment(score_split(routers, val, ids, prefix))
        out[f"agreement_{when}"] = float((chosen == own).mean())
        out[f"ppl_{when}"] = math.exp(nll[rows, chosen].mean())
        out[f"loads_{when}"] = np.bincount(chosen, minlength=len(expert_dirs)).tolist()
    return out
