"""Trainer throughput and MFU for the ~2M and ~7M CPU presets, through the real `train()`.

MFU = exact model training FLOPs per second (3 × forward, see smalltalk/flops.py) over a fp32 matmul
peak measured in the same run with the same thread count. Target: MFU >= 55% at ~7M parameters.
Figures are medians over the logged windows after the first (warm-up) one.

  python benchmarks/bench_train.py [--steps 24] [--threads 2] [--seq-len 256] [--batch 32]
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
from smalltalk.model import count_params, resolve_spec
from smalltalk.train import TrainJob, train


def random_data(directory: Path, sequences: int, seq_len: int, vocab: int) -> SplitData:
    """A prepared-data directory of random tokens (throughput does not depend on the text)."""
    directory.mkdir(parents=True)
    tokens = np.random.default_rng(0).integers(0, vocab, size=(sequences, seq_len), dtype=np.uint16)
    tokens.tofile(directory / "train.bin")
    np.save(directory / "train.seq_domains.npy", np.full(sequences, -1, np.int16))
    write_json(directory / "manifest.json", {
        "seq_len": seq_len, "vocab_size": vocab, "dtype": "uint16", "domains": [],
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    peak = measure_matmul_peak("cpu", "float32", size=2048)
    print(f"fp32 matmul peak (2048², {args.threads} threads): {peak / 1e9:.1f} GFLOP/s")
    with tempfile.TemporaryDirectory() as tmp:
        data = random_data(Path(tmp) / "data", 4096, args.seq_len, args.vocab)
        for preset in args.presets:
            spec = resolve_spec(ModelConfig(preset=preset), args.vocab)
            cfg = TrainConfig(steps=args.steps, micro_batch_size=args.batch, log_every=4, warmup_steps=2,
                              num_threads=args.threads, tensorboard=False, progress=False, peak_flops=peak)
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
