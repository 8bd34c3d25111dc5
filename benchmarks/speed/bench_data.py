"""Data pipeline throughput on corpus10 (runs/corpus10-data, 35 M chars), all figures from one run.

Prints text MB/s for (1) BPE tokenizer training, (2) raw `tokenizers.encode_batch` on the same text
already in memory, (3) our whole `data prepare` (read + split + encode + pack + write), and the ratio
(3)/(2). Target: ratio >= 0.80. Medians of --repeats runs.

  python benchmarks/speed/bench_data.py [--corpus runs/corpus10-data] [--vocab 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from smalltalk.config import load_config
from smalltalk.data.ingest import iter_documents
from smalltalk.data.prepare import prepare_data
from smalltalk.data.tokenizer import load_tokenizer, train_tokenizer

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "runs" / "corpus10-data"  # smalltalk corpus corpus10


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not Path(args.corpus).is_dir():
        print(f"corpus not found: {args.corpus} (skipping)")
        return 0
    cfg = load_config(None, [f"data.inputs=[{args.corpus}]", f"tokenizer.vocab_size={args.vocab}",
                             f"data.seq_len={args.seq_len}"])
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        manifest = train_tokenizer(cfg, run / "tokenizer")
        tok_mbs = manifest["train_mb_per_s"]
        texts = [d.text for d in iter_documents(cfg.data)]
        mb = sum(len(t) for t in texts) / 1e6
        tokenizer, _ = load_tokenizer(run / "tokenizer")
        batch = cfg.data.encode_batch_docs
        raw, ours = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for i in range(0, len(texts), batch):
                tokenizer.encode_batch(texts[i:i + batch], add_special_tokens=False)
            raw.append(mb / (time.perf_counter() - start))
            start = time.perf_counter()
            prepare_data(cfg, run / "tokenizer", run / "data")
            ours.append(mb / (time.perf_counter() - start))
    raw_med, ours_med = statistics.median(raw), statistics.median(ours)
    print(f"corpus: {len(texts)} documents, {mb:.1f} M chars, vocab {args.vocab}, seq_len {args.seq_len}")
    print(f"tokenizer training (train split): {tok_mbs:6.2f} MB/s")
    print(f"raw encode_batch (in memory):     {raw_med:6.2f} MB/s  runs {[round(x, 2) for x in raw]}")
    print(f"smalltalk data prepare (all):     {ours_med:6.2f} MB/s  runs {[round(x, 2) for x in ours]}")
    ratio = ours_med / raw_med
    print(f"prepare / raw encode_batch:       {ratio:6.2f}  (target >= 0.80: {'met' if ratio >= 0.8 else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
