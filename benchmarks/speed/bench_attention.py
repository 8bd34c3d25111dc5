"""Block-causal attention (training/cpu/attention.py) against PyTorch's CPU kernel, alone and in a training step.

1. Attention alone, forward + backward, at each preset's shape (batch x heads x T x head dim, q/k/v and
   the output laid out as the training forward has them): PyTorch's `scaled_dot_product_attention` and
   ours in alternating pairs; the median of the pairs' ratios and its interquartile range.
2. A whole training step of `training_forward` (loss, backward, clipping, fused AdamW) with our attention
   and with PyTorch's, one step each in alternating pairs, in one process: the share of the step the
   change is worth.
Pairs, not separate runs, because this 2-core VM drifts by ±10% within minutes: a pair sees one state.

  python benchmarks/speed/bench_attention.py [--presets cpu-expert-2m cpu-expert-7m] [--pairs 40] [--steps 24]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from smalltalk.config import ModelConfig
from smalltalk.llama import build_model, resolve_spec
from smalltalk.training import forward as training_forward
from smalltalk.training.cpu.attention import causal_attention
from smalltalk.training.host_memory import keep_freed_memory


def pytorch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def paired(runs: dict, pairs: int, warmup: int = 3) -> tuple[float, float, float, dict]:
    """Median, lower and upper quartile of time(pytorch) / time(ours) over alternating pairs."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(pairs + warmup):
        for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
            start = time.perf_counter()
            runs[name]()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    ratios = sorted(a / b for a, b in zip(times["pytorch"], times["ours"], strict=True))
    return (statistics.median(ratios), ratios[len(ratios) // 4], ratios[3 * len(ratios) // 4],
            {n: statistics.median(t) for n, t in times.items()})


def attention_alone(spec, batch: int, seq: int, pairs: int) -> str:
    heads, d = spec.num_heads, spec.hidden_size // spec.num_heads
    qkv = [torch.randn(batch, heads, seq, d).transpose(1, 2).requires_grad_() for _ in range(3)]
    grad = torch.randn(batch, seq, heads * d)

    def run(fn):
        def step() -> None:
            q, k, v = (z.transpose(1, 2) for z in qkv)
            fn(q, k, v, d ** -0.5).transpose(1, 2).reshape(batch, seq, heads * d).backward(grad)
        return step

    mid, lo, hi, med = paired({"pytorch": run(pytorch_attention), "ours": run(causal_attention)}, pairs)
    return (f"| attention alone, {batch}×{heads}×{seq}×{d} | {med['pytorch'] * 1e3:.1f} ms "
            f"| {med['ours'] * 1e3:.1f} ms | **{mid:.3f}×** | {lo:.3f}–{hi:.3f}× |")


def training_step(spec, batch: int, seq: int, steps: int) -> str:
    model = build_model(spec, seq)
    loss_of = training_forward.TrainingForward(model, "cpu-fused")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    ids = torch.randint(0, spec.vocab_size, (batch, seq))

    def run(attention):
        def step() -> None:
            training_forward.causal_attention = attention
            loss_of(ids, ids).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    try:
        mid, lo, hi, med = paired({"pytorch": run(pytorch_attention), "ours": run(causal_attention)}, steps)
    finally:
        training_forward.causal_attention = causal_attention
    return (f"| training step, batch {batch}×{seq} | {med['pytorch'] * 1e3:.0f} ms | {med['ours'] * 1e3:.0f} ms "
            f"| **{mid:.3f}×** | {lo:.3f}–{hi:.3f}× |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["cpu-expert-2m", "cpu-expert-7m"])
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--steps", type=int, default=24, help="training-step pairs per preset")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as train() runs
    torch.manual_seed(0)
    print("| preset | what | PyTorch's attention | ours | ratio, median of pairs | interquartile |")
    print("|---|---|---|---|---|---|")
    for preset in args.presets:
        spec = resolve_spec(ModelConfig(preset=preset), args.vocab)
        for row in (attention_alone(spec, args.batch, args.seq_len, args.pairs),
                    training_step(spec, args.batch, args.seq_len, args.steps)):
            print(f"| {preset} {row}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
