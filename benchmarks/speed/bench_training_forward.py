"""Every training forward path that can run on a device (training/paths.py) against HF's own loss there.

Per path: loss and the cosine of every parameter's gradient against `model(input_ids, labels=...).loss`
(float32 without TF32: ~1e-6; under bf16 autocast a cosine > 0.99), then forward + backward time (medians
of --rounds, paths stepped in alternation, synchronised) and tokens/s. Paths: `cpu-fused` (CPU only),
`hf`, and `liger` (CUDA with Liger-Kernel installed; measured last, on its own copy of the model, since
Liger patches transformers' Llama code). gpu_check.sh runs it on the GPU; on CPU it is the per-step view
of bench_vs_nanogpt.py's gain. Exit 1 if any path disagrees with HF's loss or gradients.

  python benchmarks/speed/bench_training_forward.py [--preset cpu-expert-2m] [--vocab 1024] [--batch 32]
      [--seq-len 256] [--device cuda] [--dtype bfloat16] [--rounds 7]
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import time

import torch

from smalltalk.config import ModelConfig
from smalltalk.llama import build_model, resolve_spec
from smalltalk.training.forward import TrainingForward
from smalltalk.training.paths import liger_available


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
    paths = [p for p in ("cpu-fused", "hf") if p != "cpu-fused" or device.type == "cpu"]
    forwards = {p: TrainingForward(model, p) for p in paths}
    runners = {"HF reference": lambda: model(input_ids=ids, labels=ids).loss,
               **{p: functools.partial(forwards[p], ids, ids) for p in paths}}
    results = _measure(model, runners, autocast, device, args.rounds)
    if device.type == "cuda" and liger_available():  # last: Liger patches transformers' Llama code
        liger_model = copy.deepcopy(model)
        liger = TrainingForward(liger_model, "liger")
        results.update(_measure(liger_model, {"liger": lambda: liger(ids, ids)}, autocast, device, args.rounds))
    elif device.type == "cuda":
        print("liger: Liger-Kernel is not installed (pip install smalltalk-lm[gpu]): not measured")
    ref_loss, ref_grads, ref_time = results.pop("HF reference")
    tokens = args.batch * args.seq_len
    print(f"{args.preset} on {device} {args.dtype}, batch {args.batch}x{args.seq_len}: HF reference loss "
          f"{ref_loss:.6f}, forward+backward {ref_time * 1e3:.1f} ms ({tokens / ref_time:,.0f} tokens/s)")
    ok = True
    for name, (loss, grads, elapsed) in results.items():
        worst = min(torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).item()
                    for a, b in zip(ref_grads, grads, strict=True))
        agrees = abs(loss - ref_loss) < 1e-2 * abs(ref_loss) and worst > 0.99
        ok &= agrees
        print(f"- {name}: loss {loss:.6f}, lowest gradient cosine {worst:.6f} ({'agrees' if agrees else 'DISAGREES'}); "
              f"{elapsed * 1e3:.1f} ms ({tokens / elapsed:,.0f} tokens/s): **{ref_time / elapsed:.2f}×** HF's")
    return 0 if ok else 1


def _measure(model, runners: dict, autocast, device: torch.device, rounds: int) -> dict:
    """name -> (loss, gradients, median forward+backward seconds), the runners stepped in alternation."""
    out = {}
    for name, loss_fn in runners.items():
        with autocast:
            loss = loss_fn()
        out[name] = [loss.item(), torch.autograd.grad(loss, list(model.parameters())), []]

    def step(loss_fn):
        def run() -> None:
            with autocast:
                loss = loss_fn()
            loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    names = list(runners)
    for r in range(rounds + 1):
        for name in (names if r % 2 == 0 else names[::-1]):
            elapsed = _timed(step(runners[name]), device)
            if r:  # round 0 warms up
                out[name][2].append(elapsed)
    return {name: (loss, grads, statistics.median(times)) for name, (loss, grads, times) in out.items()}


if __name__ == "__main__":
    sys.exit(main())
