"""One trainer for routers, experts and dense baselines.

AdamW with warmup + cosine or warmup + constant LR, gradient accumulation, clipping, bf16 autocast and
optional torch.compile, DDP under torchrun; the loss by the forward path training/paths.py picks for the device.
Checkpoints hold everything needed to continue bitwise-exactly: weights, optimizer, scheduler, RNG states
and the data cursor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from smalltalk.config import TrainConfig
from smalltalk.data.order import SequenceOrder
from smalltalk.data.shards import SplitData
from smalltalk.errors import SmalltalkError
from smalltalk.flops import measure_matmul_peak, training_flops
from smalltalk.fsutil import atomic_dir, atomic_file, read_jsonl, write_json
from smalltalk.layout import WEIGHTS, WEIGHTS_INDEX, TrainFiles
from smalltalk.llama import ModelSpec, build_model, count_params
from smalltalk.training.checkpoint import load_latest_good, prune_checkpoints, save_checkpoint
from smalltalk.training.distributed import DistContext, init_distributed, resolve_device
from smalltalk.training.forward import TrainingForward
from smalltalk.training.host_memory import keep_freed_memory
from smalltalk.training.nll import sequence_nll
from smalltalk.training.paths import choose_forward


class Sampler:
    """Deterministic epoch-wise shuffling over a fixed id set. Its state is a cursor (epoch, position) and
    the order is computed on demand (data/order.py), so neither memory nor checkpoints grow with the data."""

    def __init__(self, ids: np.ndarray | int, batch_size: int, seed: int) -> None:
        """`ids`: the sequence ids to draw from, or n for all of range(n) (no id array at all)."""
        self.ids = None if isinstance(ids, int) else ids
        self.n = ids if isinstance(ids, int) else len(ids)
        if self.n == 0:
            raise SmalltalkError("no training sequences to sample from", fix="check the data or the partition")
        self.batch_size, self.seed = batch_size, seed
        self.fingerprint = _fingerprint(ids) if self.ids is not None else f"range-{self.n}"
        self.epoch, self.pos = 0, 0
        self._current = self._order(0)  # built once per epoch, not per step

    def _order(self, epoch: int) -> SequenceOrder:
        return SequenceOrder(self.n, (self.seed, epoch))

    def _at(self, positions: np.ndarray) -> np.ndarray:
        return positions if self.ids is None else np.asarray(self.ids[positions], dtype=np.int64)

    def next_batch(self) -> np.ndarray:
        out = []
        need = self.batch_size
        while need:
            take = self._current.ids(self.pos, self.pos + need)
            out.append(take)
            need -= len(take)
            self.pos += len(take)
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._current = self._order(self.epoch)
        return self._at(np.concatenate(out))

    def consumed(self) -> np.ndarray:
        """Sorted ids drawn so far (every id once a whole epoch is done), recomputed from the cursor."""
        return np.sort(self._at(np.arange(self.n) if self.epoch > 0 else self._order(0).ids(0, self.pos)))

    def state_dict(self) -> dict:
        return {"fingerprint": self.fingerprint, "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        """Continue the cursor if the id set is the same; a new share (next EM round) starts fresh."""
        if state.get("fingerprint") == self.fingerprint:
            self.epoch, self.pos = state["epoch"], state["pos"]
            self._current = self._order(self.epoch)


def _fingerprint(ids: np.ndarray, block: int = 1 << 20) -> str:
    """sha256 of the id set, read block by block (a share may be a memory-mapped file of 10^8 ids)."""
    digest = hashlib.sha256()
    for start in range(0, len(ids), block):
        digest.update(np.ascontiguousarray(ids[start:start + block], dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr for 0-based `step`: linear warmup, then cosine to min_lr_ratio or constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    horizon = cfg.schedule_steps or cfg.steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, horizon - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class TrainJob:
    """What to train on: a model spec, a split and optionally the sequence ids this job may read."""

    spec: ModelSpec
    cfg: TrainConfig
    data: SplitData
    out_dir: Path
    ids: np.ndarray | None = None
    val: SplitData | None = None
    name: str = "lm"
    init_from: Path | None = None  # an HF model directory to start from (fine-tuning) instead of a fresh init


def _validate(job: TrainJob) -> None:
    cfg = job.cfg
    if cfg.schedule not in ("cosine", "constant"):
        raise SmalltalkError(f"train.schedule must be 'cosine' or 'constant', got {cfg.schedule!r}")
    if cfg.dtype not in ("float32", "bfloat16"):
        raise SmalltalkError(f"train.dtype must be 'float32' or 'bfloat16', got {cfg.dtype!r}")
    if job.spec.vocab_size != job.data.vocab_size:
        raise SmalltalkError(
            f"vocab/model mismatch: model vocab {job.spec.vocab_size}, data vocab {job.data.vocab_size}",
            where=str(job.data.dir), fix="use the tokenizer the data was prepared with")
    if cfg.seq_len is not None and not 2 <= cfg.seq_len <= job.data.seq_len:
        raise SmalltalkError(f"train.seq_len={cfg.seq_len} must be in [2, {job.data.seq_len}]")


def _optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW, weight decay on matrices only, with the fused kernel (one pass over all parameters; on CPU
    too, where it measured 0.65 ms per step against the loop's 3.1 ms at 2M parameters)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _Metrics:
    """metrics.jsonl (+ TensorBoard); on resume, rows past the checkpoint are dropped."""

    def __init__(self, out_dir: Path, resume_step: int, tensorboard: bool, enabled: bool) -> None:
        self.path = TrainFiles(out_dir).metrics
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if self.path.exists():  # a torn last line (killed mid-append) is dropped with the rows past the resume
            rows = [row for row in read_jsonl(self.path) if row.get("step", 0) <= resume_step]
            with atomic_file(self.path) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(TrainFiles(out_dir).tensorboard), purge_step=resume_step + 1)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def train(job: TrainJob, resume: bool = False) -> dict:
    """Run (or continue) a training job; returns the summary written to its TrainFiles.manifest."""
    _validate(job)
    cfg, out_dir = job.cfg, Path(job.out_dir)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    dist = init_distributed(device.type)
    device = resolve_device(cfg.device, dist.local_rank)
    if device.type == "cpu":
        keep_freed_memory()  # activations come back every step: no page faults for them (host_memory.py)
    seq = cfg.seq_len or job.data.seq_len
    global_batch = cfg.micro_batch_size * cfg.grad_accum * dist.world_size
    model = build_model(job.spec, max_positions=job.data.seq_len, seed=cfg.seed)
    if job.init_from is not None:
        _load_weights(model, Path(job.init_from))
    optimizer = _optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    sampler = Sampler(job.ids if job.ids is not None else len(job.data), global_batch, cfg.seed)
    step, tokens_seen, last_loss = 0, 0, float("nan")  # last_loss: the summary's final loss, kept across resumes
    checkpoint, state = load_latest_good(out_dir, model, dist.is_main) if resume else (None, None)
    if checkpoint is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        _set_rng_state(state["rng"])
        step, tokens_seen = state["step"], state["tokens_seen"]
        last_loss = state.get("last_loss", float("nan"))
        if dist.is_main:
            print(f"{job.name}: resuming from {checkpoint}", flush=True)
            prune_checkpoints(out_dir, cfg.keep_checkpoints, checkpoint)  # a kill between a save and its pruning
    elif not resume and TrainFiles(out_dir).checkpoints.exists() and dist.is_main:
        raise SmalltalkError(f"{out_dir} already holds checkpoints", fix="pass --resume, or choose a new --out")
    model.to(device)
    for opt_state in optimizer.state.values():  # moved with the model
        for key, value in opt_state.items():
            if torch.is_tensor(value) and key != "step":
                opt_state[key] = value.to(device)
    forward = choose_forward(cfg.forward, device, model)  # the one decision of the training path
    runner = _wrap(model, forward.path, cfg, dist, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = _Metrics(out_dir, step, cfg.tensorboard, dist.is_main)
    step_flops = training_flops(job.spec, seq, global_batch, 1)
    peak = cfg.peak_flops or measure_matmul_peak(str(device), "bfloat16" if cfg.dtype == "bfloat16" else "float32")
    progress = _progress(cfg, step, dist, job.name)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")

    def save(at: int) -> None:
        if dist.is_main:
            state = {"step": at, "tokens_seen": tokens_seen, "last_loss": last_loss,
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "sampler": sampler.state_dict(), "rng": _rng_state(), "world_size": dist.world_size,
                     "config": dataclasses.asdict(cfg)}
            save_checkpoint(out_dir, at, model, state, keep=cfg.keep_checkpoints)
        dist.barrier()

    window_start, window_steps = time.perf_counter(), 0
    while step < cfg.steps:
        batch_ids = sampler.next_batch()
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            offset = (micro * dist.world_size + dist.rank) * cfg.micro_batch_size
            rows = batch_ids[offset:offset + cfg.micro_batch_size]
            x = torch.from_numpy(job.data.batch(rows, seq)).to(device, non_blocking=True)
            labels = x if not hasattr(job.data, "labels") else \
                torch.from_numpy(job.data.labels(rows, seq)).to(device, non_blocking=True)  # -100: no loss
            sync = micro == cfg.grad_accum - 1 or not dist.enabled
            with (runner.no_sync() if not sync else contextlib.nullcontext()), autocast:
                loss = runner(x, labels) / cfg.grad_accum
            loss.backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 \
            else torch.zeros(())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += global_batch * seq
        window_steps += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            if dist.enabled:
                torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.AVG)
            elapsed = time.perf_counter() - window_start
            last_loss = loss_sum.item()
            tok_s = window_steps * global_batch * seq / elapsed
            mfu = window_steps * step_flops / elapsed / (peak * dist.world_size)
            metrics.log({"step": step, "loss": last_loss, "lr": scheduler.get_last_lr()[0],
                         "grad_norm": float(grad_norm), "tokens": tokens_seen,
                         "flops": training_flops(job.spec, seq, global_batch, step), "tokens_per_s": tok_s,
                         "mfu": mfu})
            progress.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tok_s:,.0f}", mfu=f"{mfu:.0%}")
            window_start, window_steps = time.perf_counter(), 0
        progress.update(1)
        if cfg.eval_every and job.val is not None and step % cfg.eval_every == 0:
            metrics.log({"step": step, "val_loss": _val_loss(model, job, device)})
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            save(step)
    progress.close()
    metrics.close()
    if checkpoint is None or step > int(checkpoint.name.split("_")[1]):
        save(step)
    if cfg.record_consumed and dist.is_main:
        with atomic_file(TrainFiles(out_dir).consumed_ids) as tmp:
            np.save(tmp, sampler.consumed())
    return _finish(job, model, step, tokens_seen, seq, global_batch, last_loss, dist, forward.path)


def _finish(job: TrainJob, model, step: int, tokens: int, seq: int, global_batch: int, loss: float,
            dist: DistContext, forward: str) -> dict:
    """Write the final HF model dir and the manifest (rank 0), atomically."""
    files = TrainFiles(Path(job.out_dir))
    params = count_params(job.spec)
    summary = {
        "kind": "train", "name": job.name, "steps": step, "tokens": tokens, "seq_len": seq,
        "global_batch": global_batch, "world_size": dist.world_size, "final_loss": loss,
        "params": params, "non_embedding_params": count_params(job.spec, embeddings=False),
        "tokens_per_param": tokens / params, "distinct_sequences": int(len(job.ids) if job.ids is not None
                                                                         else len(job.data)),
        "training_flops": {"exact": training_flops(job.spec, seq, global_batch, step, "exact"),
                           "paper": training_flops(job.spec, seq, global_batch, step, "paper")},
        "config": dataclasses.asdict(job.cfg), "data": str(job.data.dir), "forward": forward,
    }
    if dist.is_main:
        with atomic_dir(files.model) as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True)
        write_json(files.manifest, summary)
    dist.barrier()
    return summary


def _load_weights(model: torch.nn.Module, model_dir: Path) -> None:
    """Start from a trained HF model of the same shape (its positions may be fewer than the data's): one
    safetensors file, or the shards its index names (as large checkpoints are saved)."""
    from safetensors.torch import load_file

    index = model_dir / WEIGHTS_INDEX
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [WEIGHTS]
    state = {name: tensor for file in files for name, tensor in load_file(str(model_dir / file)).items()
             if not name.endswith("rotary_emb.inv_freq")}  # a buffer older checkpoints saved; recomputed here
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:  # a tied head is saved once
        raise SmalltalkError(f"{model_dir} does not fit the model: missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}", where=str(model_dir), fix="fine-tune with the model's own spec")
    model.tie_weights()


def _wrap(model, path: str, cfg: TrainConfig, dist: DistContext, device: torch.device):
    """The loss function `train()` differentiates: the forward `path` (training/paths.py), compiled / in
    DDP as asked."""
    runner = TrainingForward(model, path)
    if cfg.compile:
        runner = torch.compile(runner)
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(runner, device_ids=[device.index] if device.type == "cuda" else None)
    return runner


def _progress(cfg: TrainConfig, step: int, dist: DistContext, name: str):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=step, desc=name, disable=not (cfg.progress and dist.is_main) or None,
                dynamic_ncols=True, mininterval=1.0)


@torch.no_grad()
def _val_loss(model, job: TrainJob, device: torch.device) -> float:
    ids = job.val.sample(job.cfg.eval_batches * job.cfg.micro_batch_size)
    nll, tokens = sequence_nll(model, job.val, ids, job.cfg.micro_batch_size, device,
                               length=job.cfg.seq_len)
    model.train()
    return nll / max(tokens, 1)
