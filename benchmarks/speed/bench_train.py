"""Trainer throughput and MFU for the ~2M and ~7M CPU presets, through the real `train()`.

MFU = exact model training FLOPs per second (3 × forward, see smalltalk/flops.py) over a fp32 matmul
peak measured in the same run with the same thread count. Target: MFU >= 55% at ~7M parameters.
Figures are medians over the logged windows after the first (warm-up) one.

  python benchmarks/speed/bench_train.py [--steps 24] [--threads 2] [--seq-len 256] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from smalltalk.config import ModelConfig, TrainConfig
from smalltalk.data.shards import SplitData
from smalltalk.flops import measure_matmul_peak
from smalltalk.fsutil import write_json
from smalltalk.llama import count_params, resolve_spec
from smalltalk.training.trainer import TrainJob, train


def random_data(directory: Path, sequences: int, seq_len: int, vocab: int) -> SplitData:
    """A prepared-data directory of random tokens (throughput does not depend on the text)."""
    directory.mkdir(parents=True)
    dtype = np.uint16 if vocab < 65536 else np.uint32
    tokens = np.random.default_rng(0).integers(0, vocab, size=(sequences, seq_len), dtype=dtype)
    tokens.tofile(directory / "train.bin")
    np.save(directory / "train.seq_domains.npy", np.full(sequences, -1, np.int16))
    write_json(directory / "manifest.json", {
        "seq_len": seq_len, "vocab_size": vocab, "dtype": np.dtype(dtype).name, "domains": [],
        "splits": {"train": {"sequences": sequences, "tokens": sequences * seq_len}}})
    return SplitData(directory, "train")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["cpu-expert-2m", "cpu-expert-7m"])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--peak", type=float, help="peak FLOP/s (e.g. the card's bf16 peak); default: measured matmul")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    peak = args.peak or measure_matmul_peak(args.device, args.dtype, size=2048 if args.device == "cpu" else 8192)
    print(f"peak for MFU ({args.device}, {args.dtype}): {peak / 1e9:,.1f} GFLOP/s"
          + ("" if args.peak else " (measured matmul)"))
    with tempfile.TemporaryDirectory() as tmp:
        data = random_data(Path(tmp) / "data", 4096, args.seq_len, args.vocab)
        if args.steps <= 4:
            raise SystemExit("--steps must be above 4 (the first logged window is warm-up)")
        for preset in args.presets:
            spec = resolve_spec(ModelConfig(preset=preset), args.vocab)
            cfg = TrainConfig(steps=args.steps, micro_batch_size=args.batch, log_every=4, warmup_steps=2,
                              num_threads=args.threads, tensorboard=False, progress=False, peak_flops=peak,
                              device=args.device, dtype=args.dtype, compile=args.compile)
            out = Path(tmp) / preset
            train(TrainJob(spec, cfg, data, out, name=preset))
            rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]
            tok_s = statistics.median(r["tokens_per_s"] for r in rows)
            mfu = statistics.median(r["mfu"] for r in rows)
            verdict = "" if preset != "cpu-expert-7m" else f"  (target >= 55%: {'met' if mfu >= 0.55 else 'MISSED'})"
            print(f"{preset:16s} {count_params(spec) / 1e6:5.2f}M params  batch {args.batch}×{args.seq_len}  "
                  f"{tok_s:9,.0f} tokens/s  MFU {mfu:5.1%}{verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
