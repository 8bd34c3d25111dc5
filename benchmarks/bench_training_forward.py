"""training_forward's loss against HF's forward on one device: agreement, then forward+backward time.

Agreement: loss and the cosine of every parameter's gradient (float32 without TF32 it is ~1e-6; under bf16
autocast a cosine > 0.99). Time: HF's `model(input_ids, labels=...).loss` and `causal_lm_loss` stepped in
alternation (forward + backward, synchronised), --rounds medians, and the ratio. gpu_check.sh runs it on
the GPU; on CPU it is the per-step view of bench_vs_nanogpt.py's gain.

  python benchmarks/bench_training_forward.py [--preset cpu-expert-2m] [--vocab 1024] [--batch 32]
      [--seq-len 256] [--device cuda] [--dtype bfloat16] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from smalltalk.config import ModelConfig
from smalltalk.model import build_model, resolve_spec
from smalltalk.training.forward import causal_lm_loss


def _timed(step, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu-expert-2m")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    model = build_model(resolve_spec(ModelConfig(preset=args.preset), args.vocab), args.seq_len).to(device)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    losses = {"hf": lambda: model(input_ids=ids, labels=ids).loss, "ours": lambda: causal_lm_loss(model, ids, ids)}
    grads = {}
    for name, loss_fn in losses.items():
        with autocast:
            loss = loss_fn()
        grads[name] = (loss.item(), torch.autograd.grad(loss, list(model.parameters())))
    worst = min(torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).item()
                for a, b in zip(grads["hf"][1], grads["ours"][1], strict=True))
    print(f"{args.preset} on {device} {args.dtype}: loss HF {grads['hf'][0]:.6f} ours {grads['ours'][0]:.6f}; "
          f"lowest gradient cosine {worst:.6f}")

    def step(loss_fn):
        def run() -> None:
            with autocast:
                loss = loss_fn()
            loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    times = {name: [] for name in losses}
    for r in range(args.rounds + 1):
        for name in (list(losses) if r % 2 == 0 else list(losses)[::-1]):
            elapsed = _timed(step(losses[name]), device)
            if r:  # round 0 warms up
                times[name].append(elapsed)
    hf, ours = (statistics.median(times[n]) for n in ("hf", "ours"))
    tokens = args.batch * args.seq_len
    print(f"forward+backward: HF {hf * 1e3:.1f} ms ({tokens / hf:,.0f} tokens/s), ours {ours * 1e3:.1f} ms "
          f"({tokens / ours:,.0f} tokens/s): **{hf / ours:.2f}×**")
    ok = abs(grads["hf"][0] - grads["ours"][0]) < 1e-2 * abs(grads["hf"][0]) and worst > 0.99
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
