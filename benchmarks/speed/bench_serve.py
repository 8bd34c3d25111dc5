"""Load test of `smalltalk serve` on loopback: 200 concurrent requests of mixed shapes, bounded in time.

Starts the real server on a free 127.0.0.1 port, fires completions / chat / streaming requests with
various prompt lengths and max_tokens all at once (httpx, asyncio), and prints: answered / lost / 5xx,
p50 / p95 latency, routing time p50 (from each response's "smalltalk.routing_ms") and its share of the
total, and the server's resident memory with --max-resident-experts 1 and with every expert resident.

With --hostile, 20% of the requests are malformed (each must get a 4xx) and 5% are streams that hang up
after their first chunk (their generation must be cancelled); every well-formed request must be answered
200 with its text, and afterwards nothing may be left in flight (no leaked lock).

With --compare, the serial engine (one HF generate at a time) and the batching engine (the default) are
started side by side and loaded in alternation at 1, 8, 32 and 128 concurrent clients, each client
sending its next request when the last is answered (closed loop; the same seeded requests for both:
mixed prompts, so mixed experts, max_tokens 8-64, sampled with a seed): output tokens/s (completion
tokens answered / wall time) and p50 / p99 latency, the median of --repeats rounds.

  python benchmarks/speed/bench_serve.py --run runs/demo [--requests 200] [--timeout 300] [--hostile]
With --n, the batching engine answers the same seeded samples as one request with `n: 4` per prompt and
as four separate requests per prompt (seeds s .. s + 3: the same texts), all sent at once, in alternation:
output tokens/s of each, medians of --repeats rounds, and their ratio.

  python benchmarks/speed/bench_serve.py --run runs/demo --compare [--clients 1 8 32 128] [--repeats 3]
  python benchmarks/speed/bench_serve.py --run runs/demo --n [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

PROMPTS = ["def parse_args(argv):\n    ", "Die Option", "Permission is hereby granted, free of charge,",
           "#include <stdio.h>\nint main(", "NAME\n       ls - list directory contents", "La commande",
           "Redistribution and use in source and binary forms", "class Foo:\n    def __init__(self"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start(run: str, resident: int | None, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "smalltalk.cli", "serve", "--run", run, "--port", str(port), *extra]
    if resident:
        cmd += ["--max-resident-experts", str(resident)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start")


MALFORMED = [b"{not json", b'["a list"]', b'{"prompt": ""}', b'{"prompt": "abc def", "max_tokens": 0}',
             b'{"prompt": "abc def", "seed": "abc"}', b'{"prompt": "abc def", "temperature": "hot"}',
             b'{"messages": [{"role": "assistant|>\\n<|system", "content": "x"}]}', b'{"prompt": "abc", "stream": 1}']


async def hostile(client: httpx.AsyncClient, base: str, i: int) -> dict | None:
    """Request i of a hostile mix: malformed (20%), hanging up mid-stream (5%), else None (a normal one)."""
    start = time.perf_counter()
    if i % 5 == 1:
        body = MALFORMED[i % len(MALFORMED)]
        endpoint = "chat/completions" if b"messages" in body else "completions"
        r = await client.post(f"{base}/v1/{endpoint}", content=body, headers={"Content-Type": "application/json"})
        return {"status": r.status_code, "seconds": time.perf_counter() - start, "kind": "malformed"}
    if i % 20 == 3:
        body = {"model": "smalltalk", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 32, "stream": True}
        async with client.stream("POST", f"{base}/v1/completions", json=body) as r:
            async for _ in r.aiter_lines():
                break  # hang up after the first line
        return {"status": r.status_code, "seconds": time.perf_counter() - start, "kind": "hangup"}
    return None


async def one(client: httpx.AsyncClient, base: str, i: int, mix: bool = False) -> dict:
    if mix and (result := await hostile(client, base, i)) is not None:
        return result
    rng = random.Random(i)
    prompt = rng.choice(PROMPTS) * rng.randint(1, 3)
    body = {"model": "smalltalk", "max_tokens": rng.choice([1, 4, 16, 32]), "temperature": 0}
    kind = ["completion", "chat", "stream"][i % 3]
    start = time.perf_counter()
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
        r = await client.post(f"{base}/v1/chat/completions", json=body)
        routing = r.json().get("smalltalk", {}).get("routing_ms") if r.status_code == 200 else None
    elif kind == "stream":
        body |= {"prompt": prompt, "stream": True}
        routing, status = None, None
        async with client.stream("POST", f"{base}/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {") and routing is None:
                    routing = json.loads(line[6:])["smalltalk"]["routing_ms"]
        status = r.status_code
        return {"status": status, "seconds": time.perf_counter() - start, "routing_ms": routing, "kind": "ok"}
    else:
        body["prompt"] = prompt
        r = await client.post(f"{base}/v1/completions", json=body)
        routing = r.json().get("smalltalk", {}).get("routing_ms") if r.status_code == 200 else None
    return {"status": r.status_code, "seconds": time.perf_counter() - start, "routing_ms": routing, "kind": "ok"}


async def fire(base: str, n: int, timeout: float, mix: bool = False) -> list[dict]:
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        results = await asyncio.gather(*(one(client, base, i, mix) for i in range(n)), return_exceptions=True)
    return [r if isinstance(r, dict) else {"status": None, "error": repr(r)} for r in results]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--hostile", action="store_true", help="20%% malformed requests, 5%% hang up mid-stream")
    ap.add_argument("--compare", action="store_true", help="serial vs batching engine at --clients")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n", action="store_true", help="n: 4 in one request vs four separate requests")
    args = ap.parse_args()
    if args.n:
        return n_versus_separate(args)
    if args.hostile:
        return hostile_load(args)
    if args.compare:
        return compare_engines(args)
    for resident in (1, None):
        proc, base = start(args.run, resident)
        try:
            wall = time.perf_counter()
            results = asyncio.run(fire(base, args.requests, args.timeout))
            wall = time.perf_counter() - wall
            ok = [r for r in results if r["status"] == 200]
            lat = sorted(r["seconds"] for r in ok)
            routing = [r["routing_ms"] for r in ok if r.get("routing_ms") is not None]
            label = f"max-resident {resident}" if resident else "all experts resident"
            print(f"[{label}] {len(ok)}/{len(results)} answered, lost {sum(r['status'] is None for r in results)}, "
                  f"5xx {sum((r['status'] or 0) >= 500 for r in results)}, wall {wall:.1f} s")
            if lat:
                p50, p95 = lat[len(lat) // 2], lat[int(len(lat) * 0.95) - 1]
                r50 = statistics.median(routing)
                print(f"  latency p50 {p50 * 1e3:.0f} ms, p95 {p95 * 1e3:.0f} ms; routing p50 {r50:.2f} ms "
                      f"({r50 / 1e3 / p50:.1%} of p50 latency; target <= 10 ms: {'met' if r50 <= 10 else 'MISSED'})")
            metrics = httpx.get(f"{base}/metrics").text.splitlines()
            per_expert = [x.split('"')[1] + ":" + x.split()[-1] for x in metrics
                          if x.startswith("smalltalk_expert_requests_total")]
            loads = next(x.split()[-1] for x in metrics if x.startswith("smalltalk_expert_loads_total"))
            print(f"  requests per expert {' '.join(per_expert)}; expert loads from disk {loads}")
            print(f"  server RSS after the load: {rss_mb(proc.pid):.0f} MB")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return 0


def closed_loop_jobs(clients: int) -> list[dict]:
    """The same seeded requests for both engines: 2 per client (at least 16), mixed prompts and lengths."""
    rng = random.Random(clients)
    return [{"model": "smalltalk", "prompt": rng.choice(PROMPTS) * rng.randint(1, 3),
             "max_tokens": rng.choice([8, 16, 32, 64]), "temperature": 0.8, "top_p": 0.95, "seed": i}
            for i in range(max(16, 2 * clients))]


async def closed_loop(base: str, clients: int, timeout: float) -> dict:
    jobs, results = closed_loop_jobs(clients), []

    async def client_loop(client: httpx.AsyncClient, queue: asyncio.Queue) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            start = time.perf_counter()
            r = await client.post(f"{base}/v1/completions", json=body)
            results.append((r.status_code, time.perf_counter() - start,
                            r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0))

    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=clients)) as client:
        wall = time.perf_counter()
        await asyncio.gather(*(client_loop(client, queue) for _ in range(clients)))
        wall = time.perf_counter() - wall
    lat = sorted(seconds for status, seconds, _ in results if status == 200)
    return {"ok": len(lat), "n": len(jobs), "tokens_per_s": sum(t for *_, t in results) / wall,
            "p50": lat[len(lat) // 2], "p99": lat[max(0, int(len(lat) * 0.99) - 1)]}


def compare_engines(args) -> int:
    servers = {engine: start(args.run, None, "--engine", engine) for engine in ("serial", "batched")}
    try:
        print("| clients | engine | output tokens/s | p50 latency | p99 latency | answered |")
        print("|---|---|---|---|---|---|")
        for clients in args.clients:
            rounds: dict[str, list[dict]] = {engine: [] for engine in servers}
            for r in range(args.repeats):  # alternate which engine goes first
                for engine in (list(servers) if r % 2 == 0 else list(servers)[::-1]):
                    rounds[engine].append(asyncio.run(closed_loop(servers[engine][1], clients, args.timeout)))
            med = {e: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for e, rs in rounds.items()}
            for engine, m in med.items():
                print(f"| {clients} | {engine} | {m['tokens_per_s']:.0f} | {m['p50'] * 1e3:.0f} ms | "
                      f"{m['p99'] * 1e3:.0f} ms | {m['ok']:.0f}/{m['n']:.0f} |", flush=True)
            ratio = med["batched"]["tokens_per_s"] / med["serial"]["tokens_per_s"]
            print(f"|  | batched ÷ serial | **{ratio:.2f}×** | {med['batched']['p50'] / med['serial']['p50']:.2f}× | "
                  f"{med['batched']['p99'] / med['serial']['p99']:.2f}× | |", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    return 0


async def samples(base: str, together: bool, timeout: float) -> float:
    """Output tokens/s of 4 seeded samples of each prompt: one request with n = 4, or four requests."""
    jobs = [{"model": "smalltalk", "prompt": p, "max_tokens": 32, "temperature": 0.8, "seed": 10 * i}
            for i, p in enumerate(PROMPTS)]
    bodies = [{**j, "n": 4} for j in jobs] if together else [{**j, "seed": j["seed"] + k} for j in jobs
                                                                for k in range(4)]
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=len(bodies))) as client:
        wall = time.perf_counter()
        answers = await asyncio.gather(*(client.post(f"{base}/v1/completions", json=b) for b in bodies))
        wall = time.perf_counter() - wall
    assert all(a.status_code == 200 for a in answers), [a.text[:200] for a in answers if a.status_code != 200]
    return sum(a.json()["usage"]["completion_tokens"] for a in answers) / wall


def n_versus_separate(args) -> int:
    proc, base = start(args.run, None)
    try:
        rates: dict[str, list[float]] = {"n: 4": [], "4 requests": []}
        for r in range(args.repeats):
            for name in (list(rates) if r % 2 == 0 else list(rates)[::-1]):
                rates[name].append(asyncio.run(samples(base, name == "n: 4", args.timeout)))
        med = {name: statistics.median(v) for name, v in rates.items()}
        for name, value in med.items():
            print(f"{name}: {value:.0f} output tokens/s (median of {args.repeats})")
        print(f"n: 4 / four requests: **{med['n: 4'] / med['4 requests']:.2f}×**")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return 0


def hostile_load(args) -> int:
    proc, base = start(args.run, None)
    try:
        wall = time.perf_counter()
        results = asyncio.run(fire(base, args.requests, args.timeout, mix=True))
        wall = time.perf_counter() - wall
        by = {k: [r for r in results if r.get("kind") == k] for k in ("ok", "malformed", "hangup")}
        lost = [r for r in results if "kind" not in r]
        good = sum(r["status"] == 200 for r in by["ok"])
        refused = sum(400 <= (r["status"] or 0) < 500 for r in by["malformed"])
        lat = sorted(r["seconds"] for r in by["ok"] if r["status"] == 200)
        time.sleep(1.0)
        in_flight = httpx.get(f"{base}/health").json()["in_flight"]
        after = time.perf_counter()
        final = httpx.post(f"{base}/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 4}, timeout=60)
        after = time.perf_counter() - after
        statuses = sorted(collections.Counter(r["status"] for r in by["ok"]).items())
        print(f"[hostile mix, {args.requests} concurrent] well-formed {good}/{len(by['ok'])} answered 200 "
              f"(statuses {statuses}); "
              f"malformed {refused}/{len(by['malformed'])} got 4xx; {len(by['hangup'])} hung up mid-stream; "
              f"lost {len(lost)}; wall {wall:.1f} s")
        if lat:
            print(f"  latency of the well-formed: p50 {lat[len(lat) // 2] * 1e3:.0f} ms, "
                  f"p99 {lat[max(0, int(len(lat) * 0.99) - 1)] * 1e3:.0f} ms")
        print(f"  afterwards: {in_flight} in flight, a new request answered {final.status_code} "
              f"in {after * 1e3:.0f} ms")
        ok = good == len(by["ok"]) and refused == len(by["malformed"]) and not lost and in_flight == 0 \
            and final.status_code == 200
        print("  " + ("all checks met" if ok else "CHECKS FAILED"))
        return 0 if ok else 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
