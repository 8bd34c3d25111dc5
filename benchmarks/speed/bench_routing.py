"""Router scoring throughput, balanced-assignment time and corpus10 partition wall time, in one run.

For the CPU router presets at E = 4 and 10 and prefix 32 and 256: prefixes/s and achieved GFLOP/s
(exact forward FLOPs of all E routers) as a fraction of a fp32 matmul peak measured in the same run.
Then balanced assignment for N = 1M, E = 32, and the partition of corpus10 (E = 10, prefix 256) through
the real `smalltalk partition`. Targets: scoring >= 40% of peak; assignment < 10 s. Medians of 3.

  python benchmarks/speed/bench_routing.py [--threads 2] [--run runs/routing10]
  python benchmarks/speed/bench_routing.py --ngram    # count-based n-gram routers only
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from smalltalk.config import ModelConfig
from smalltalk.flops import forward_flops, measure_matmul_peak
from smalltalk.llama import build_model, resolve_spec
from smalltalk.routing.assignment import balanced_assignment
from smalltalk.routing.routers import LMRouters
from smalltalk.routing.scoring import default_workers
from smalltalk.training.host_memory import keep_freed_memory

CORPUS = Path(__file__).resolve().parents[2] / "runs" / "corpus10-data"  # smalltalk corpus corpus10


def median_time(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_scoring(peak: float, vocab: int, compile: bool, presets: list[str], device: str = "cpu",
                  dtype: str = "float32", expert_counts: tuple[int, ...] = (4, 10), batch_tokens: int = 16384) -> None:
    """Our scoring path (HF body, blocked cross-entropy LM head): routers one after another (1 worker),
    side by side (the default on CPU: one worker per thread), and optionally compiled."""
    paths = {"1 worker": (False, 1), "default workers": (False, None)} if device == "cpu" else {
        "default workers": (False, None)}  # one worker on GPU
    paths["grouped"] = (False, "grouped")  # routing/grouped.py, forced for every batch size
    if compile:
        paths["compiled"] = (True, None)
    print("| router | E | prefix | batch | workers | prefixes/s (default) | "
          + " | ".join(f"{p} GFLOP/s (of peak)" for p in paths) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(paths))
    for preset in presets:
        spec = resolve_spec(ModelConfig(preset=preset), vocab)
        for experts in expert_counts:
            models = [build_model(spec, 256, seed=e).eval() for e in range(experts)]
            routers = {name: LMRouters(models, device, compile=use_compiled, workers=None if workers == "grouped"
                                       else workers, dtype=dtype, grouped=workers == "grouped")  # the CLI's path
                       for name, (use_compiled, workers) in paths.items()}
            routers["grouped"].GROUPED_CPU_TOKENS = 1 << 62
            for prefix in (32, 256):
                batch = max(8, batch_tokens // prefix)
                n = batch * 4
                tokens = np.random.default_rng(0).integers(0, vocab, size=(n, prefix))
                flops = experts * forward_flops(spec, prefix, n)
                cells, rate = [], 0.0
                for name, router in routers.items():
                    router.batch_size = batch
                    router.score(tokens[:batch])  # warm-up (and compilation)
                    seconds = median_time(lambda r=router, t=tokens: r.score(t))
                    if name == "default workers":
                        rate = n / seconds
                    cells.append(f"{flops / seconds / 1e9:.1f} ({flops / seconds / peak:.0%})")
                print(f"| {preset} | {experts} | {prefix} | {batch} | {default_workers(device, experts)} | "
                      f"{rate:,.0f} | " + " | ".join(cells) + " |")


def bench_head(vocab: int) -> None:
    """The LM-head block size (scoring.HEAD_BLOCK_LOGITS): one thread, -cross_entropy over row blocks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    peak = measure_matmul_peak("cpu", "float32", size=2048)
    print(f"LM head, 1 thread (peak {peak / 1e9:.1f} GFLOP/s): fraction of peak by rows per block")
    print("| d | " + " | ".join(f"{rows} rows" for rows in (256, 1024, 2048)) + " |\n|---|---|---|---|")
    for d in (32, 48, 96):
        hidden, weight = torch.randn(16384, d), torch.randn(vocab, d) * 0.1
        targets = torch.randint(0, vocab, (16384,))
        cells = []
        for rows in (256, 1024, 2048):
            def head(rows: int = rows, h: torch.Tensor = hidden, w: torch.Tensor = weight,
                     t: torch.Tensor = targets) -> None:
                for s in range(0, len(h), rows):
                    F.cross_entropy(h[s:s + rows] @ w.T, t[s:s + rows], reduction="none")
            head()
            cells.append(f"{2 * 16384 * d * vocab / median_time(head, 5) / peak:.0%}")
        print(f"| {d} | " + " | ".join(cells) + " |")
    torch.set_num_threads(threads)


def bench_prompt(run: Path, repeats: int = 41) -> None:
    """Routing one prompt (M tokens, all E routers) vs one expert forward over a whole test sequence, on a
    trained mixture: the per-router loop and the grouped forward (routing/grouped.py), interleaved."""
    from smalltalk.data.shards import SplitData
    from smalltalk.mixture.model import SmallTalkMixture

    mixture = SmallTalkMixture.from_pretrained(run, device="cpu")
    x = SplitData(run / "data", "test").batch(np.arange(1))
    expert, grouped = mixture.expert(0), mixture.routers.grouped
    times: dict[str, list[float]] = {"loop": [], "grouped": [], "expert": []}
    for _ in range(repeats):
        for name in ("loop", "grouped"):
            mixture.routers.grouped = grouped if name == "grouped" else None
            start = time.perf_counter()
            mixture.route(x)
            times[name].append(time.perf_counter() - start)
        start = time.perf_counter()
        with torch.inference_mode():
            expert(input_ids=torch.from_numpy(x))
        times["expert"].append(time.perf_counter() - start)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"routing one prompt ({mixture.num_experts} routers, M = {mixture.prefix}) vs the expert's forward on "
          f"{x.shape[1]} tokens, {run}: loop {med['loop']:.2f} ms ({med['loop'] / med['expert']:.2f}x), grouped "
          f"{med['grouped']:.2f} ms ({med['grouped'] / med['expert']:.2f}x), expert {med['expert']:.2f} ms "
          f"(target grouped <= 0.6x: {'met' if med['grouped'] <= 0.6 * med['expert'] else 'MISSED'})")


def bench_ngram() -> None:
    """Count-based n-gram routers (routing/ngram.py, bigrams): prefixes scored per second on this process's
    threads (numpy: one core), at the demo's size and at paper-1.3b's (E = 32, 32k vocabulary, prefix 256,
    hashed into 2^20 cells per router), and what partitioning paper-1.3b's 2.1B sequences would take."""
    from smalltalk.routing.ngram import NgramRouters

    print("| n-gram routers | E | vocab | prefix | prefixes/s | router-tokens/s |\n|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for experts, vocab, prefix in ((4, 512, 64), (32, 32000, 256)):
        routers = NgramRouters.empty(experts, vocab, 2, float(vocab), 1 << 20)
        for table in (routers.pairs, routers.contexts, routers.unigrams):
            table[:] = rng.random(table.shape, dtype=np.float32)  # every cell counted: no cache-friendly zeros
        tokens = rng.integers(0, vocab, (2048, prefix))
        routers.score(tokens[:64])
        rate = len(tokens) / median_time(lambda r=routers, t=tokens: r.score(t))
        tokens_rate = rate * experts * (prefix - 1)
        print(f"| order 2 | {experts} | {vocab} | {prefix} | {rate:,.0f} | {tokens_rate / 1e6:.0f}M |")
    sequences = 32 * 512_000 * 128  # paper-1.3b: what its 32 experts train on
    print(f"partitioning paper-1.3b ({sequences / 1e9:.1f}B sequences) at the last rate: "
          f"{sequences / rate / 3600:,.0f} core-hours")


def bench_assignment() -> None:
    scores = np.random.default_rng(0).normal(size=(1_000_000, 32)).astype(np.float32)
    scores -= np.linspace(0, 1, 32, dtype=np.float32)[None]  # some experts more popular than others
    seconds = median_time(lambda: balanced_assignment(scores))
    verdict = "met" if seconds < 10 else "MISSED"
    print(f"balanced assignment N=1,000,000 E=32: {seconds:.2f} s (target < 10 s: {verdict})")


def bench_partition(run: Path | None, threads: int) -> None:
    from smalltalk.cli import main as smalltalk

    if not CORPUS.is_dir():
        print("corpus10 not found: partition benchmark skipped")
        return
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        if run is None or not (run / "data" / "manifest.json").exists():
            run = base / "run"
            common = ["--run", str(run), "--set", f"data.inputs=[{CORPUS}]", "--set", "data.seq_len=256",
                      "--set", "tokenizer.vocab_size=1024"]
            assert smalltalk(["tokenizer", "train", *common]) == 0
            assert smalltalk(["data", "prepare", *common]) == 0
        routers = run / "routers-em-256"
        if not (routers / "manifest.json").exists():
            routers = base / "routers"
            assert smalltalk(["routers", "train", "--run", str(run), "--out", str(routers), "--experts", "10",
                              "--prefix", "256", "--rounds", "1", "--chunk", "1000", "--set",
                              "routing.train.steps=1", "--set", f"routing.train.num_threads={threads}"]) == 0
        start = time.perf_counter()
        assert smalltalk(["partition", "--run", str(run), "--routers", str(routers), "--out", str(base / "part"),
                          "--prefix", "256"]) == 0
        print(f"partition of corpus10 (E=10, prefix 256): {time.perf_counter() - start:.1f} s wall")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--run", help="a run with corpus10 data (and routers-em-256) to reuse")
    ap.add_argument("--presets", nargs="+", default=["cpu-router-0.03m", "cpu-router-0.1m", "cpu-router-0.5m"])
    ap.add_argument("--head", action="store_true", help="also time LM-head block sizes (1 thread)")
    ap.add_argument("--skip-partition", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd router bodies")
    ap.add_argument("--device", default="cpu", help="e.g. cuda (scoring only: head/assignment/partition stay CPU)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="bfloat16: autocast")
    ap.add_argument("--experts", nargs="+", type=int, default=[4, 10])
    ap.add_argument("--batch-tokens", type=int, default=16384, help="prefix tokens per scoring batch")
    ap.add_argument("--prompt", help="only time routing one prompt on this trained run (e.g. runs/demo)")
    ap.add_argument("--ngram", action="store_true", help="only time count-based n-gram routers (one core)")
    args = ap.parse_args()
    if args.ngram:
        bench_ngram()
        return 0
    if args.prompt:
        torch.set_num_threads(args.threads)
        bench_prompt(Path(args.prompt))
        return 0
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the smalltalk command does
    size = 2048 if args.device == "cpu" else 8192
    peak = measure_matmul_peak(args.device, args.dtype, size=size)
    print(f"{args.dtype} matmul peak ({size}², {args.device}, {args.threads} threads): {peak / 1e9:.1f} GFLOP/s")
    bench_scoring(peak, args.vocab, args.compile, args.presets, args.device, args.dtype, tuple(args.experts),
                  args.batch_tokens)
    if args.head:
        bench_head(args.vocab)
    bench_assignment()
    if not args.skip_partition:
        bench_partition(Path(args.run) if args.run else None, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
