"""The server's limits: how long a client may take (headers, body, reading its stream), how many may
connect, which keys start it, what a broken or silent backend gets, and how many experts sit in memory
while batches run. Tests marked "Was:" failed on the code before issue #28's fixes."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import httpx
import pytest

from smalltalk.mixture.model import SmallTalkMixture

from .conftest import ROOT
from .test_serve import _free_port, _start, prompts_per_expert
from .test_serve_hostile import _counts, keyed_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(pipeline_run):
    yield from keyed_server(pipeline_run[0])


def test_a_client_that_never_finishes_its_headers_or_body_is_dropped(server):
    """Was: no header-read timeout and no body deadline: a slow client held its socket (and, mid-body, its
    slot of the queue) for as long as it liked."""
    base, _ = server
    url = urlparse(base)
    headers_only = socket.create_connection((url.hostname, url.port), timeout=10)
    headers_only.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    started = time.perf_counter()
    assert headers_only.recv(1024) == b""  # closed by the server, not by our 10 s timeout
    assert time.perf_counter() - started < 6
    half_body = socket.create_connection((url.hostname, url.port), timeout=10)
    half_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-test\r\n"
                      b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\": \"ab")
    answer = b""
    while b"request_timeout" not in answer and (chunk := half_body.recv(4096)):
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
    assert httpx.get(f"{base}/health").json()["in_flight"] == 0
    assert _counts(base).get(("completions", "408"), 0) >= 1


def test_empty_keys_are_refused_and_an_open_host_warns(pipeline_run):
    """Was: `--api-key ''` or `SMALLTALK_API_KEY=` silently turned authentication off, and serving on 0.0.0.0
    without a key said nothing."""
    run = str(pipeline_run[0])
    command = [sys.executable, "-m", "smalltalk.cli", "serve", "--run", run, "--port", str(_free_port())]
    env = {k: v for k, v in os.environ.items() if k != "SMALLTALK_API_KEY"}
    for extra, environ in (([ "--api-key", ""], env), ([], {**env, "SMALLTALK_API_KEY": ""})):
        done = subprocess.run(command + extra, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "API key is empty" in done.stderr
    done = subprocess.run(command + ["--max-batch", "0"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "--max-batch" in done.stderr  # was: accepted, and the loop busy-spun
    proc = subprocess.Popen(command + ["--host", "0.0.0.0"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "without an API key" in line
    finally:
        proc.kill()
        proc.wait()


# ---- a broken or slow backend behind `--backend openai` ---------------------------------------------------

class _Backend(BaseHTTPRequestHandler):
    """An OpenAI-compatible expert server that misbehaves as `mode` says (a stand-in for someone else's
    server: we test what our front does with its replies, not the backend)."""

    mode = "garbage"
    seen: list[tuple[str | None, str, str]] = []  # (Authorization, the body's model, the path) of each POST

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._send(200, b'{"data": [{"id": "x"}]}', "application/json")

    trickled: list[int] = []  # chunks each "trickle" reply managed to write before its reader went away

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append((self.headers.get("Authorization"), body.get("model"), self.path))
        if self.mode == "trickle":
            return self._trickle()
        if self.mode == "slow":
            time.sleep(30)
        replies = {"garbage": b"data: {not json\n\n", "list": b"data: [1, 2]\n\n",
                   "bad-usage": b'data: {"choices": [{"text": "hi"}], "usage": {"completion_tokens": "x"}}\n\n'}
        self._send(200, replies.get(self.mode, b""), "text/event-stream")

    def _trickle(self) -> None:
        """25 chunks, one every 0.2 s (5 s in all), unless the reader hangs up first."""
        sent = 0
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for _ in range(25):
                self.wfile.write(b'data: {"choices": [{"text": "ab", "finish_reason": null}]}\n\n')
                self.wfile.flush()
                sent += 1
                time.sleep(0.2)
            self.wfile.write(b"data: [DONE]\n\n")
        except OSError:
            pass
        finally:
            self.trickled.append(sent)

    def _send(self, status: int, body: bytes, kind: str) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass


@contextlib.contextmanager
def _front_on_fake_backend(run, userinfo: str = "", *args: str, env: dict | None = None):
    """`serve --backend openai` with every expert's URL on one `_Backend` (URL user info `userinfo`): (front's
    base URL, the backend server); both stopped on exit."""
    backend = ThreadingHTTPServer(("127.0.0.1", 0), _Backend)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    url = f"http://{userinfo}127.0.0.1:{backend.server_address[1]}/v1"
    experts = SmallTalkMixture.from_pretrained(run).num_experts
    urls = [x for k in range(experts) for x in ("--expert-url", f"{k}={url}")]
    front, base = _start(run, "--backend", "openai", *urls, *args, env=env)
    try:
        yield base, backend
    finally:
        front.terminate()
        front.wait(timeout=20)
        backend.shutdown()


def test_a_malformed_or_slow_backend_gives_502_or_504_and_health_hides_its_url(pipeline_run):
    """Was: a malformed backend reply gave a 500 (or a cut stream), a silent backend held the request for
    600 s, and the unauthenticated /health listed backend URLs with their credentials. Also: a client that
    leaves mid-stream stops the generation (here: the front stops reading a backend that streams for 5 s)."""
    with _front_on_fake_backend(pipeline_run[0], "user:s3cret@", "--request-timeout", "2") as (base, backend):
        health = httpx.get(f"{base}/health").text
        assert "s3cret" not in health and str(backend.server_address[1]) not in health
        body = {"model": "smalltalk", "prompt": "xyz_ {} = 1", "max_tokens": 4}
        for mode in ("garbage", "list", "bad-usage"):
            _Backend.mode = mode
            r = httpx.post(f"{base}/v1/completions", json=body, timeout=30)
            assert r.status_code == 502 and r.json()["error"]["code"] == "backend_error", (mode, r.text)
            with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}, timeout=30) as s:
                events = [line for line in s.iter_lines() if line.startswith("data:")]
            assert "backend_error" in events[-1], (mode, events)  # an error event, not a cut stream
        _Backend.mode = "trickle"  # a client that leaves mid-stream: the front stops reading its backend
        before = _counts(base, {})
        with httpx.stream("POST", f"{base}/v1/completions", json={**body, "max_tokens": 50, "stream": True},
                          timeout=30) as s:
            first = next(line for line in s.iter_lines() if line.startswith("data:"))
        assert '"ab"' in first
        deadline = time.time() + 10
        while not _Backend.trickled or httpx.get(f"{base}/health").json()["in_flight"]:
            assert time.time() < deadline, "the stream went on after its client left"
            time.sleep(0.05)
        assert _Backend.trickled[-1] < 15, _Backend.trickled  # 25 when nobody stops it
        assert _counts(base, {}).get(("completions", "200"), 0) == before.get(("completions", "200"), 0)
        _Backend.mode = "slow"
        started = time.perf_counter()
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        assert time.perf_counter() - started < 10


def test_the_front_sends_the_backend_key_and_the_model_id_the_backend_lists(pipeline_run):
    """docs/serving.md: the key for the backends comes from SMALLTALK_BACKEND_API_KEY, and each request names
    the model id the backend's /v1/models lists (vLLM names a model after its path)."""
    env = {**os.environ, "SMALLTALK_BACKEND_API_KEY": "bk-s3cret"}
    with _front_on_fake_backend(pipeline_run[0], env=env) as (base, _):
        _Backend.mode, _Backend.seen[:] = "garbage", []
        r = httpx.post(f"{base}/v1/completions", json={"model": "smalltalk", "prompt": "xyz_ {} = 1",
                                                       "max_tokens": 4}, timeout=30)
        assert r.status_code == 502  # the reply is garbage; what matters is what the backend was sent
        assert _Backend.seen == [("Bearer bk-s3cret", "x", "/v1/completions")]


# ---- memory bound of the batched engine -------------------------------------------------------------------

def test_max_resident_bounds_experts_while_batches_run_and_loads_leave_the_scheduler(pipeline_run, monkeypatch):
    """Was: with the batched engine a running batch kept its expert alive after LRU eviction (one open stream
    per expert pinned them all while /metrics said one was resident), and expert loads ran on the scheduler
    thread, stalling every decode step. Now at most max_resident experts run or sit in memory at any moment,
    loads happen on the loader thread, and every request still gets its greedy text."""
    import transformers

    from smalltalk.serving.batching import BatchedEngine
    from smalltalk.serving.serial import SerialEngine

    run = pipeline_run[0]
    reference = SerialEngine(SmallTalkMixture.from_pretrained(run), "smalltalk", 64)
    mixture = SmallTalkMixture.from_pretrained(run, max_resident=1)
    engine = BatchedEngine(mixture, "smalltalk", 64)
    load_threads = []
    real = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        load_threads.append(threading.current_thread().name)
        return real(cls, *args, **kwargs)

    prompts = sorted(prompts_per_expert(run, mixture).items())
    experts = len(prompts)
    jobs = [(k, p) for k, p in prompts for _ in range(3)]

    def complete(engine, prompt):
        req = engine.validate({"prompt": prompt, "max_tokens": 12, "temperature": 0}, chat=False)
        routing = engine.route(req)
        return routing["expert"], engine.generate(req, routing)[0]

    want = [complete(reference, p) for _, p in jobs]
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(recording))
    got: list = [None] * len(jobs)
    peak = {"batches": 0, "resident": 0}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak["batches"] = max(peak["batches"], len(engine._batches))
            peak["resident"] = max(peak["resident"], len(mixture.resident_experts))
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, complete(engine, jobs[i][1])))
               for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    stop.set()
    watcher.join()
    engine.close()
    assert got == want and {k for k, _ in got} == {k for k, _ in prompts}
    assert peak == {"batches": 1, "resident": 1}, peak
    assert len(load_threads) >= experts - 1 and set(load_threads) == {"smalltalk-expert-loader_0"}, load_threads


def test_connections_beyond_the_limit_get_503(pipeline_run):
    """Was: uvicorn ran without limit_concurrency: any number of idle connections were held open. With
    `--max-connections 3`, three idle sockets leave no room: the next request gets uvicorn's 503; once they
    close, the server answers again."""
    proc, base = _start(pipeline_run[0], "--max-connections", "3", "--client-timeout", "30")
    try:
        url = urlparse(base)
        idle = [socket.create_connection((url.hostname, url.port)) for _ in range(3)]
        time.sleep(0.3)
        assert httpx.get(f"{base}/health", timeout=10).status_code == 503
        for s in idle:
            s.close()
        deadline = time.time() + 10
        while httpx.get(f"{base}/health", timeout=10).status_code != 200:
            assert time.time() < deadline
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_a_client_that_stops_reading_its_stream_is_dropped_and_frees_its_slot(pipeline_run):
    """The ASGI side of an unread stream: the socket's buffer is full, so sending the next chunk blocks (here
    the client's `send` never returns after the headers). After --client-timeout the request is dropped: its
    generation is cancelled, its slot freed, and it is counted as a 408. A loopback socket would need ~100 kB
    of a tiny model's output to fill, more than its context allows, hence the ASGI-level client."""
    import asyncio

    from smalltalk.serving.app import create_app
    from smalltalk.serving.batching import BatchedEngine

    engine = BatchedEngine(SmallTalkMixture.from_pretrained(pipeline_run[0]), "smalltalk", 64)
    app = create_app(engine, client_timeout=0.5)
    body = json.dumps({"prompt": "xyz_ {} = 1", "max_tokens": 40, "temperature": 1.0, "seed": 1,
                       "stream": True}).encode()
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "headers": [(b"content-type", b"application/json")], "http_version": "1.1",
             "scheme": "http", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 5), "root_path": "",
             "asgi": {"version": "3.0"}}
    sent = []

    async def run() -> float:
        stuck = asyncio.Event()
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if messages:
                return messages.pop(0)
            await stuck.wait()  # the client never disconnects: it just stops reading

        async def send(message):
            sent.append(message["type"])
            if message["type"] == "http.response.body":
                await stuck.wait()  # the socket's buffer is full: this never returns

        started = time.perf_counter()
        await asyncio.wait_for(app(scope, receive, send), 20)
        return time.perf_counter() - started

    seconds = asyncio.run(run())
    assert 0.5 <= seconds < 10 and sent[0] == "http.response.start"
    assert engine.in_flight == 0 and engine.metrics.requests[("completions", 408)] == 1
    deadline = time.time() + 10
    while engine.gauges()["batched_rows"]:  # the generation was cancelled, not left running
        assert time.time() < deadline
        time.sleep(0.05)
    engine.close()
