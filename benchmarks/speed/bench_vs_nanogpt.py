"""Our trainer against nanoGPT's: tokens/s and FLOP/s, measured side by side in one run.

Ours is the real `train()` (HF Llama: RoPE, RMSNorm, SwiGLU; AdamW with decay on matrices only, grad
clipping, LR schedule, logging). The reference is nanoGPT's model.py, condensed below (pre-LN GPT-2:
learned positions, LayerNorm without bias, GELU MLP of 4d, tied embeddings, causal SDPA) with
nanoGPT's training step (the same AdamW groups and settings as ours, clipping, `set_to_none`, the loss
read back only at log steps). Same width, depth, heads, vocabulary, batch and sequence length; the data
are the same random tokens. The two run in alternation, --rounds times (order alternating), each for
--steps steps in a fresh process of its own (no heap or allocator state shared); the figure is the median
over the timed windows after the first of each round; the last column gives the spread of
the rounds' own ratios (this VM's noise). Tokens/s counts predicted tokens on both sides
(255 of a 256-token row). FLOP/s counts each model's own training FLOPs with
nanoGPT's own estimate (6 × matmul parameters + 12·L·T·d per token, for both). Both presets' SwiGLU is
8d/3 wide (model.py's rule: nanoGPT's 4d GELU MLP's parameters and FLOPs), so tokens/s compare models of
equal cost; `--mlp-width` sets another width (e.g. 768 at cpu-expert-7m: 9d² per layer against 8d²).

On CPU `train()` fixes glibc's malloc thresholds for its process (host_memory.py: freed activations are
kept for the next step instead of being page-faulted in again); nanoGPT runs with glibc's defaults, as its
train.py does. `--same-allocator` gives nanoGPT's process the same setting.

  python benchmarks/speed/bench_vs_nanogpt.py [--presets cpu-expert-2m cpu-expert-7m] [--compile] [--rounds 3]
      [--mlp-width N] [--same-allocator]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from smalltalk.config import ModelConfig, TrainConfig
from smalltalk.data.shards import SplitData
from smalltalk.llama import ModelSpec, build_model, count_params, resolve_spec
from smalltalk.training.host_memory import keep_freed_memory
from smalltalk.training.trainer import TrainJob, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import random_data  # noqa: E402


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(b, t, d))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    """nanoGPT's GPT (Karpathy, model.py), bias=False, dropout 0."""

    def __init__(self, spec: ModelSpec, block_size: int) -> None:
        super().__init__()
        d = spec.hidden_size
        self.wte, self.wpe = nn.Embedding(spec.vocab_size, d), nn.Embedding(block_size, d)
        self.h = nn.ModuleList(Block(d, spec.num_heads) for _ in range(spec.num_layers))
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.lm_head = nn.Linear(d, spec.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * spec.num_layers) if name.endswith(("c_proj.weight", "mlp_proj.weight")) \
                    else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))



def flops_per_token(model: nn.Module, spec: ModelSpec, t: int) -> float:
    """nanoGPT's estimate_mfu count: 6 × matmul parameters (tied embedding once, no positions) + 12·L·T·d."""
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and "wpe" not in n)
    return 6 * matmul + 12 * spec.num_layers * t * spec.hidden_size


def nanogpt_windows(spec: ModelSpec, cfg: TrainConfig, data_dir: Path, steps: int, window: int, compile_: bool,
                    same_allocator: bool) -> list[float]:
    """tokens/s of each window of `window` steps (the first window, warm-up and compilation, dropped)."""
    torch.set_num_threads(cfg.num_threads)
    if same_allocator:
        keep_freed_memory()
    data = SplitData(data_dir)
    seq = data.seq_len
    torch.manual_seed(cfg.seed)
    model = NanoGPT(spec, seq)
    runner = torch.compile(model) if compile_ else model
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2))
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed)).numpy()
    rates, start = [], time.perf_counter()
    for step in range(steps):
        rows = order[(step * cfg.micro_batch_size) % len(data):][:cfg.micro_batch_size]
        x = torch.from_numpy(data.batch(rows, seq).astype("int64"))
        loss = runner(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % window == 0:
            loss.item()
            now = time.perf_counter()
            rates.append(window * cfg.micro_batch_size * (seq - 1) / (now - start))
            start = now
    return rates[1:]


def ours_windows(spec: ModelSpec, cfg: TrainConfig, data_dir: Path, out: Path) -> list[float]:
    """Predicted tokens/s, as nanoGPT's side counts them: train() logs the seq_len tokens a row feeds in,
    of which seq_len - 1 have a target (nanoGPT feeds those seq_len - 1 only)."""
    data = SplitData(data_dir)
    train(TrainJob(spec, cfg, data, out, name="ours"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["tokens_per_s"] * (data.seq_len - 1) / data.seq_len for r in rows[1:]]


def in_fresh_process(fn, *args) -> list[float]:
    """fn(*args) in a new interpreter: each side starts from the same clean heap, allocator and caches."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["cpu-expert-2m", "cpu-expert-7m"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--compile", action="store_true", help="torch.compile on both sides")
    ap.add_argument("--mlp-width", type=int, help="our SwiGLU's width instead of the preset's")
    ap.add_argument("--same-allocator", action="store_true",
                    help="nanoGPT's process keeps freed memory as train()'s does (host_memory.py)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mode = ("compiled" if args.compile else "eager") + (", same allocator" if args.same_allocator else "")
    print(f"| model | params (ours / nanoGPT) | ours tokens/s | nanoGPT tokens/s | tokens/s ratio | FLOP/s ratio |"
          f" one round's ratio, min–max ({mode}) |\n|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        data = random_data(Path(tmp) / "data", 4096, args.seq_len, args.vocab)
        for preset in args.presets:
            spec = resolve_spec(ModelConfig(preset=preset), args.vocab)
            if args.mlp_width:
                spec = dataclasses.replace(spec, intermediate_size=args.mlp_width)
            cfg = TrainConfig(steps=args.steps, micro_batch_size=args.batch, log_every=args.window, warmup_steps=2,
                              num_threads=args.threads, tensorboard=False, progress=False, peak_flops=1e12,
                              compile=args.compile, checkpoint_every=0)
            ours, ref, rounds = [], [], []
            for r in range(args.rounds):
                got = {}
                for side in (("ours", "ref") if r % 2 == 0 else ("ref", "ours")):
                    if side == "ours":
                        got[side] = in_fresh_process(ours_windows, spec, cfg, data.dir, Path(tmp) / f"{preset}-{r}")
                    else:
                        got[side] = in_fresh_process(nanogpt_windows, spec, cfg, data.dir, args.steps, args.window,
                                                     args.compile, args.same_allocator)
                ours, ref = ours + got["ours"], ref + got["ref"]
                rounds.append(statistics.median(got["ours"]) / statistics.median(got["ref"]))
            a, b = statistics.median(ours), statistics.median(ref)
            ref_model = NanoGPT(spec, args.seq_len)
            our_flops = flops_per_token(build_model(spec, args.seq_len), spec, args.seq_len)
            ref_flops = flops_per_token(ref_model, spec, args.seq_len - 1)
            ref_params = sum(p.numel() for p in ref_model.parameters()) - args.seq_len * spec.hidden_size
            fed = args.seq_len / (args.seq_len - 1)  # our FLOPs run over every fed token, `a` counts predicted ones
            print(f"| {preset} | {count_params(spec) / 1e6:.2f}M / {ref_params / 1e6:.2f}M | {a:,.0f} | {b:,.0f} | "
                  f"**{a / b:.2f}×** | {a * fed * our_flops / (b * ref_flops):.2f}× | "
                  f"{min(rounds):.2f}–{max(rounds):.2f}× |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
