"""Partition at growing N: peak RSS and seconds per sequence must not grow with the corpus.

Synthetic prepared data (seq_len 16, vocab 256, 4 "domains" = 4 token ranges, written with
`write_pretokenized`) at N = 100k, 400k, 1.6M training sequences; E routers of the smallest preset trained
briefly by EM on the smallest set; then `smalltalk partition` (prefix 8, chunk 65,536) in a fresh process
per N, its peak RSS read from wait4(). Every output is checked: each sequence exactly once.
Target (issue #12): peak RSS + <= 64 MB from 100k to 1.6M, seconds per sequence within 1.25x.
With --method ngram, the same with count-based bigram routers trained by the same EM (their tables are
fixed-size, so RSS must stay flat as well). With --eval, the same for `smalltalk eval` of one small mixture
on 100k..1.6M test sequences; with --prepare, the same for `smalltalk data prepare` on 100k..1.6M JSONL
documents (4 input files, one process that encodes and merges; its document indexes are streamed, so RSS
must stay flat).

  python benchmarks/speed/bench_partition_scale.py [--sizes 100000 400000 1600000] [--experts 4]
      [--method em|ngram] [--eval] [--prepare]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from smalltalk.data.shards import write_pretokenized

ROOT = Path(__file__).resolve().parents[2]
SEQ, VOCAB, DOMAINS = 16, 256, 4


def synthetic_data(out: Path, n: int, seed: int = 0, test: bool = False) -> None:
    """n sequences; domain d draws its tokens from [64d, 64d + 64) with a per-domain skew, in domain blocks
    (file order), written through a memmap so this process never holds them either."""
    rng = np.random.default_rng(seed)
    tokens = np.lib.format.open_memmap(out.with_suffix(".tmp.npy"), mode="w+", dtype=np.uint16, shape=(n, SEQ))
    labels = np.repeat(np.arange(DOMAINS, dtype=np.int16), -(-n // DOMAINS))[:n]
    for start in range(0, n, 1 << 16):
        part = labels[start:start + (1 << 16)]
        skew = rng.integers(0, 64, size=(len(part), SEQ)) ** 2 // 64  # low ids more frequent
        tokens[start:start + len(part)] = (part[:, None].astype(np.int64) * 64 + skew).astype(np.uint16)
    val = n // 50
    splits, domains = {"train": tokens, "validation": tokens[:val]}, {"train": labels, "validation": labels[:val]}
    if test:  # the same rows as a test split, for the evaluation scaling
        splits["test"], domains["test"] = tokens, labels
    write_pretokenized(out, splits, VOCAB, 0, "synthetic", domains, [f"d{d}" for d in range(DOMAINS)])
    del tokens
    out.with_suffix(".tmp.npy").unlink()


def run_measured(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return time.perf_counter() - start, usage.ru_maxrss * 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 400_000, 1_600_000])
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=65536)
    ap.add_argument("--router", default="cpu-router-0.03m")
    ap.add_argument("--method", choices=["em", "ngram"], default="em", help="LM routers or count-based bigram ones")
    ap.add_argument("--eval", action="store_true", help="also measure `smalltalk eval` at the same sizes")
    ap.add_argument("--prepare", action="store_true", help="only measure `smalltalk data prepare` (documents)")
    args = ap.parse_args()
    if args.prepare:
        prepare_scale(args.sizes)
        return 0
    smalltalk = [sys.executable, "-m", "smalltalk.cli"]
    common = ["--set", f"routing.router.preset={args.router}", "--set", "routing.prefix=8",
              "--set", f"routing.experts={args.experts}", "--set", "routing.train.num_threads=2",
              "--set", "routing.score_batch_size=1024", "--set", f"routing.method={args.method}"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for n in args.sizes:
            synthetic_data(tmp / f"data-{n}", n)
        routers = tmp / "routers"
        subprocess.run([*smalltalk, "routers", "train", "--run", str(tmp), "--data", str(tmp / f"data-{args.sizes[0]}"),
                        "--out", str(routers), "--rounds", "2", "--chunk", "4096", *common,
                        "--set", "routing.train.steps=50", "--set", "routing.heldout_sequences=256"],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        rows = []
        for n in args.sizes:
            out = tmp / f"partition-{n}"
            seconds, rss = run_measured([*smalltalk, "partition", "--run", str(tmp), "--data", str(tmp / f"data-{n}"),
                                         "--routers", str(routers), "--out", str(out), "--chunk-size",
                                         str(args.chunk), *common])
            manifest = json.loads((out / "manifest.json").read_text())
            seen = np.zeros(n, dtype=np.uint8)
            for name in manifest["files"]:
                np.add.at(seen, np.load(out / name), 1)
            assert (seen == 1).all(), f"N={n}: a sequence is missing or repeated"
            rows.append({"n": n, "seconds": seconds, "rss_mb": rss / 2**20, "nmi": manifest["quality"]["nmi"],
                         "us_per_seq": manifest["seconds"] / n * 1e6})  # the partition's own time, no startup
    base = rows[0]
    routers_are = f"routers of {args.router}" if args.method == "em" else "bigram routers (routing.method=ngram)"
    print(f"partition, E={args.experts} {routers_are}, prefix 8, chunk {args.chunk}, seq_len {SEQ}")
    print("| N | process wall s | partition us/sequence | peak RSS MB | RSS - RSS(first) | time/seq ÷ first | NMI | "
          "exactly once |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["us_per_seq"] / base["us_per_seq"]
        print(f"| {r['n']:,} | {r['seconds']:.1f} | {r['us_per_seq']:.1f} | {r['rss_mb']:.0f} | "
              f"{r['rss_mb'] - base['rss_mb']:+.0f} | {ratio:.2f} | {r['nmi']:.3f} | yes |")
    growth, slow = rows[-1]["rss_mb"] - base["rss_mb"], rows[-1]["us_per_seq"] / base["us_per_seq"]
    print(f"target: RSS growth <= 64 MB ({growth:+.0f}), time/seq ratio <= 1.25 ({slow:.2f}): "
          + ("met" if growth <= 64 and slow <= 1.25 else "NOT met"))
    if args.eval:
        eval_scale(args, smalltalk, common)
    return 0


def eval_scale(args, smalltalk: list[str], common: list[str]) -> None:
    """`smalltalk eval` on N = sizes test sequences of one mixture (experts of test-tiny, 30 steps each):
    streaming evaluation must not grow with N either."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        run.mkdir()
        synthetic_data(run / "data", max(args.sizes), test=True)
        tiny = [*common, *[x for o in ("model.preset=test-tiny", "train.steps=30", "train.num_threads=2",
                                       "train.micro_batch_size=16", "train.progress=false", "train.tensorboard=false")
                           for x in ("--set", o)]]
        steps = [["routers", "train", "--rounds", "2", "--chunk", "4096", "--set", "routing.train.steps=50",
                  "--set", "routing.heldout_sequences=256"], ["partition"],
                 *[["experts", "train", "--expert", str(k)] for k in range(args.experts)]]
        for step in steps:
            subprocess.run([*smalltalk, *step, "--run", str(run), *tiny], check=True, cwd=ROOT,
                           stdout=subprocess.DEVNULL)
        rows = []
        for n in args.sizes:
            seconds, rss = run_measured([*smalltalk, "eval", "--run", str(run), "--out", str(run / f"eval-{n}"), *tiny,
                                         "--set", f"eval.max_sequences={n}", "--set", "eval.batch_size=512",
                                         "--set", "eval.prefixes=[4,8]", "--set", "eval.top_k=[1,2]"])
            results = json.loads((run / f"eval-{n}" / "results.json").read_text())
            assert results["sequences"] == n
            rows.append({"n": n, "seconds": seconds, "rss_mb": rss / 2**20, "us_per_seq": seconds / n * 1e6})
    base = rows[0]
    print(f"\neval of a {args.experts}-expert mixture (test-tiny experts, routers on M̂ 4 and 8, top-1/2)")
    print("| N test sequences | wall s | us/sequence | peak RSS MB | RSS - RSS(first) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']:,} | {r['seconds']:.1f} | {r['us_per_seq']:.1f} | {r['rss_mb']:.0f} | "
              f"{r['rss_mb'] - base['rss_mb']:+.0f} |")


WORDS = [["int", "void", "return", "struct", "{", "}", ";"], ["der", "die", "und", "nicht", "ist"],
         ["the", "of", "and", "to", "was"], ["le", "la", "et", "les", "des"]]


def write_documents(directory: Path, n: int) -> list[Path]:
    """n short documents (5-40 words of one of 4 vocabularies) in 4 JSONL files, written in blocks."""
    rng, paths = np.random.default_rng(0), []
    directory.mkdir(parents=True)
    for f in range(4):
        path = directory / f"docs-{f}.jsonl"
        with open(path, "w") as handle:
            for start in range(f * n // 4, (f + 1) * n // 4, 10_000):
                count = min(10_000, (f + 1) * n // 4 - start)
                lengths, domains = rng.integers(5, 40, count), rng.integers(0, 4, count)
                handle.writelines(json.dumps({"text": " ".join(rng.choice(WORDS[d], k)), "domain": f"d{d}"}) + "\n"
                                  for k, d in zip(lengths, domains, strict=True))
        paths.append(path)
    return paths


def prepare_scale(sizes: list[int]) -> None:
    smalltalk = [sys.executable, "-m", "smalltalk.cli"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            run, inputs = Path(tmp) / f"run-{n}", write_documents(Path(tmp) / f"docs-{n}", n)
            common = ["--run", str(run), "--set", f"data.inputs=[{inputs[0].parent}]", "--set", "data.seq_len=16",
                      "--set", "routing.prefix=8", "--set", "eval.prefixes=[8]", "--set", "tokenizer.vocab_size=320"]
            subprocess.run([*smalltalk, "tokenizer", "train", *common], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            seconds, rss = run_measured([*smalltalk, "data", "prepare", *common])
            manifest = json.loads((run / "data" / "manifest.json").read_text())
            assert manifest["documents"] == n, manifest["documents"]
            rows.append({"n": n, "seconds": seconds, "rss_mb": rss / 2**20,
                         "us_per_doc": manifest["seconds"] / n * 1e6})
            for path in inputs:
                path.unlink()
    base = rows[0]
    print("data prepare (4 JSONL files, one process: encode + merge)")
    print("| N documents | process wall s | encode us/document | peak RSS MB | RSS - RSS(first) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']:,} | {r['seconds']:.1f} | {r['us_per_doc']:.1f} | {r['rss_mb']:.0f} | "
              f"{r['rss_mb'] - base['rss_mb']:+.0f} |")


if __name__ == "__main__":
    sys.exit(main())
