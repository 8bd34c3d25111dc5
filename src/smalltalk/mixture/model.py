"""SmallTalkMixture: routers + independent experts + tokenizer, tied together by mixture.json.

Inference rule (the paper's): score the prompt's first M tokens with every router, take the argmax
(uniform prior, no balancing) and run exactly that one expert.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Collection
from pathlib import Path

import numpy as np
import torch

from smalltalk.data.tokenizer import encode_text
from smalltalk.errors import SmalltalkError
from smalltalk.fsutil import read_json, write_json
from smalltalk.layout import RunLayout, manifest_of
from smalltalk.llama import quiet_transformers
from smalltalk.routing.assignment import argmax_assignment
from smalltalk.routing.routers import load_router_dirs, load_routers, routers_checksum
from smalltalk.training.distributed import resolve_device


def write_mixture_manifest(run: RunLayout) -> dict | None:
    """mixture.json, once every expert of the partition is trained (None before). Relative paths, so a run
    directory (or an export of it) can move. A manifest edited by elastic add/remove is kept as it is."""
    if run.has_mixture() and "elastic" in run.mixture():
        return run.mixture()
    if not manifest_of(run.partition).is_file():  # an expert job on a machine that holds only its own data
        return None
    experts = run.num_experts()
    if not all(run.expert_done(k) for k in range(experts)):
        return None
    routers, partition = run.routers_manifest(), run.partition_manifest()
    checksum = routers_checksum(run.routers)
    if partition.get("routers_sha256") not in (None, checksum):  # partitioned with `--routers OTHER`
        raise SmalltalkError(f"the partition was made with other routers ({partition.get('routers')}, sha256 "
                             f"{partition['routers_sha256'][:12]}) than the run's {run.routers} ({checksum[:12]}): "
                             "the experts would be served on another split than they trained on",
                             where=str(manifest_of(run.partition)),
                             fix="partition again with the run's routers, or put the partition's routers at "
                                 "RUN/routers")
    manifest = {
        "kind": "smalltalk-mixture", "format_version": 1, "method": routers["method"], "experts": experts,
        "routers": _rel(run, run.routers), "tokenizer": _rel(run, run.tokenizer),
        "prefix": partition.get("prefix", routers["prefix"]),  # the prefix the experts' shares were routed on
        "routers_sha256": checksum, "routing_dtype": partition.get("dtype", "float32"),
        "expert_dirs": [run.expert_model_rel(k) for k in range(experts)],
    }
    refined = manifest_of(run.routers_refined)
    if refined.is_file() and read_json(refined).get("refined_from") == checksum:  # experts/refine.py
        manifest.update({"routers": _rel(run, run.routers_refined), "routers_sha256": routers_checksum(
            run.routers_refined), "refined": True, "partition_routers_sha256": checksum})
    write_json(run.mixture_file, manifest)
    return manifest


def _rel(run: RunLayout, path: Path) -> str:
    return str(path.relative_to(run.root))


def _check_routers(routers_dir: Path, manifest: dict) -> None:
    """The routers a mixture routes with must be the ones its partition was made with, or their refinement
    (mixture.json keeps their checksum): otherwise prompts go to experts by another rule than intended."""
    recorded = manifest.get("routers_sha256")
    if recorded is None:  # a mixture written before the checksum was recorded
        return
    found = routers_checksum(routers_dir)
    if found != recorded:
        raise SmalltalkError(f"the routers at {routers_dir} (sha256 {found[:12]}) are not the ones the experts' "
                             f"partition was made with ({recorded[:12]}, recorded in mixture.json)",
                             where=str(routers_dir), fix="restore the run's routers, or retrain the experts on a "
                                                         "partition made with these routers")


class SmallTalkMixture:
    def __init__(self, root: Path, manifest: dict, device: str = "cpu", max_resident: int | None = None,
                 routing_workers: int | None = 1, routing_batch: int = 256) -> None:
        """routing_workers: routers scored side by side (None: one per CPU thread). The default 1 is for
        generate/serve: scoring threads would change the thread count under a concurrent generation; a
        batch job alone in its process (eval) passes None."""
        quiet_transformers()
        self.root, self.manifest, self.device = Path(root), manifest, resolve_device(device)
        self.num_experts: int = manifest["experts"]
        self.prefix: int = manifest["prefix"]
        if manifest.get("router_dirs"):  # written by elastic add/remove: the router of each expert, in order
            self.routers = load_router_dirs(manifest["method"], [self.root / d for d in manifest["router_dirs"]],
                                            str(self.device), routing_batch, routing_workers)
        else:
            _check_routers(self.root / manifest["routers"], manifest)
            self.routers = load_routers(self.root / manifest["routers"], str(self.device), routing_batch,
                                        workers=routing_workers, dtype=manifest.get("routing_dtype", "float32"))
        self.max_resident = max_resident  # None: keep every expert once loaded
        self._experts: OrderedDict[int, torch.nn.Module] = OrderedDict()
        self._lock, self._load_lock = threading.Lock(), threading.Lock()
        self._tokenizer = None
        self.loads = 0  # expert loads from disk (evictions make this exceed num_experts)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", max_resident: int | None = None,
                        routing_workers: int | None = 1, routing_batch: int = 256) -> SmallTalkMixture:
        path = Path(path)
        return cls(path, RunLayout(path).mixture(), device, max_resident, routing_workers, routing_batch)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.root / self.manifest["tokenizer"]))
        return self._tokenizer

    def expert(self, index: int, busy: Collection[int] = ()) -> torch.nn.Module:
        """Expert `index`, loaded on first use; at most `max_resident` stay in memory (LRU), so a mixture
        larger than memory can still serve. A caller keeps its reference while it uses the model; `busy`:
        experts a caller still runs, never evicted here (the batched engine's running batches)."""
        with self._load_lock:  # one load at a time; room is made before it, so memory stays within the bound
            with self._lock:
                if index in self._experts:
                    self._experts.move_to_end(index)
                    return self._experts[index]
            self.evict(keep={*busy, index}, room=1)
            from transformers import AutoModelForCausalLM

            path = self.root / self.manifest["expert_dirs"][index]
            model = AutoModelForCausalLM.from_pretrained(str(path)).to(self.device).eval()
            with self._lock:
                self.loads += 1
                self._experts[index] = model
            self.evict(keep={*busy, index})
            return model

    def evict(self, keep: Collection[int] = (), room: int = 0) -> None:
        """Drop least recently used experts outside `keep` until at most max_resident - room stay."""
        if not self.max_resident:
            return
        with self._lock:
            for index in [k for k in self._experts if k not in keep]:
                if len(self._experts) <= self.max_resident - room:
                    break
                del self._experts[index]

    def is_resident(self, index: int) -> bool:
        return index in self._experts

    @property
    def resident_experts(self) -> list[int]:
        return list(self._experts)

    def route(self, input_ids, prefix_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(chosen expert [B], router scores [B, E]) from the first prefix_len tokens of each row."""
        ids = np.atleast_2d(np.asarray(input_ids.cpu() if torch.is_tensor(input_ids) else input_ids))
        prefix = min(prefix_len or self.prefix, ids.shape[1])
        if prefix < 2:
            raise SmalltalkError("routing needs at least 2 tokens of prompt")
        scores = self.routers.score(ids[:, :prefix])
        return argmax_assignment(scores), scores

    @torch.inference_mode()
    def score(self, input_ids, prefix_len: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
        """Per-token NLL [B, S-1] of each row under its routed expert, and the chosen experts."""
        from smalltalk.training.nll import token_nll

        ids = torch.as_tensor(np.atleast_2d(np.asarray(input_ids)), dtype=torch.long)
        chosen, _ = self.route(ids, prefix_len)
        out = torch.empty(ids.shape[0], ids.shape[1] - 1)
        for k in np.unique(chosen):
            rows = torch.from_numpy(np.flatnonzero(chosen == k))
            out[rows] = token_nll(self.expert(int(k)), ids[rows].to(self.device)).cpu()
        return out, chosen

    @torch.inference_mode()
    def generate(self, prompt: str, max_new_tokens: int = 64, prefix_len: int | None = None,
                 reroute_at: int | None = None, **kwargs) -> dict:
        """Route the prompt, then HF `generate` (KV cache) with the one chosen expert.

        A prompt shorter than the prefix is routed on the tokens it has. With `reroute_at=M`, once prompt +
        generated text reach M tokens the routers score again and, if another expert now wins, generation
        continues with it (the context is re-encoded by the new expert)."""
        ids = torch.tensor([encode_text(self.tokenizer, prompt)], dtype=torch.long)
        if ids.shape[1] < 2:
            raise SmalltalkError("prompt must be at least 2 tokens long to be routed")
        chosen, scores = self.route(ids, prefix_len)
        experts = [int(chosen[0])]
        pad = self.tokenizer.eos_token_id
        first_leg = max_new_tokens
        if reroute_at is not None and ids.shape[1] < reroute_at:
            first_leg = min(max_new_tokens, reroute_at - ids.shape[1])
        out = self.expert(experts[0]).generate(ids.to(self.device), max_new_tokens=first_leg, pad_token_id=pad,
                                               **kwargs).cpu()
        rest = max_new_tokens - (out.shape[1] - ids.shape[1])
        if reroute_at is not None and first_leg < max_new_tokens and rest > 0 and out.shape[1] >= reroute_at:
            new_choice, scores = self.route(out, reroute_at)
            experts.append(int(new_choice[0]))
            out = self.expert(experts[-1]).generate(out.to(self.device), max_new_tokens=rest, pad_token_id=pad,
                                                    **kwargs).cpu()
        text = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        return {"expert": experts[-1], "experts": experts, "scores": scores[0].tolist(), "text": text}
