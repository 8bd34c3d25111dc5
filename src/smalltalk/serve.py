"""`smalltalk serve`: an OpenAI-compatible HTTP server for a SmallTalk mixture (FastAPI + uvicorn).

Endpoints: GET /health, GET /metrics (Prometheus text), GET /v1/models, POST /v1/completions,
POST /v1/chat/completions (SSE streaming with "stream": true). Every response carries the routing
decision as "smalltalk": {"expert", "scores", "routing_ms"}. Bad requests get a 4xx JSON error in the
OpenAI shape {"error": {"message", "type", "param", "code"}}; the process never crashes on input.

Chat template (documented, deliberately simple): each message becomes "<|role|>\\ncontent\\n" and the
prompt ends with "<|assistant|>\\n"; generation stops at the end-of-text token. Roles are
system, user or assistant, and a content holding a role marker is refused (it would forge a turn).

Hostile clients: bodies over `max_body_bytes` get 413 before they are read in full; a prompt longer than
the context could ever hold is refused before it is tokenised, and tokenisation runs off the event loop
(/health keeps answering); every field is type-checked (4xx, never 500); the API key (SMALLTALK_API_KEY,
--api-key-file) is compared in constant time and also guards /metrics; a client that disconnects cancels
its generation, queued or running; beyond `max_queue` requests in flight the answer is 503 + Retry-After.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.requests import ClientDisconnect
from transformers import StoppingCriteria

from smalltalk.mixture import SmallTalkMixture


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


@dataclass
class Metrics:
    requests: Counter = field(default_factory=Counter)  # by endpoint and status
    expert_requests: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_sum: float = 0.0
    routing_sum: float = 0.0
    completed: int = 0

    def snapshot(self, mixture: SmallTalkMixture) -> dict:
        """This process's counters as JSON (what `--workers` sums across processes)."""
        return {"requests": [[e, s, n] for (e, s), n in sorted(self.requests.items())],
                "expert_requests": {str(k): n for k, n in self.expert_requests.items()},
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "latency_sum": self.latency_sum, "routing_sum": self.routing_sum, "completed": self.completed,
                "resident_experts": len(mixture.resident_experts), "expert_loads": mixture.loads}


def render_metrics(snapshots: list[dict]) -> str:
    """Prometheus text of the sum of one or more processes' snapshots."""
    requests, experts, totals = Counter(), Counter(), Counter()
    for snap in snapshots:
        requests.update({(e, int(s)): n for e, s, n in snap["requests"]})
        experts.update({int(k): n for k, n in snap["expert_requests"].items()})
        totals.update({k: v for k, v in snap.items() if k not in ("requests", "expert_requests")})
    lines = ["# TYPE smalltalk_requests_total counter"]
    lines += [f'smalltalk_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(requests.items())]
    lines += ["# TYPE smalltalk_expert_requests_total counter"]
    lines += [f'smalltalk_expert_requests_total{{expert="{k}"}} {n}' for k, n in sorted(experts.items())]
    lines += [f"smalltalk_prompt_tokens_total {totals['prompt_tokens']}",
              f"smalltalk_completion_tokens_total {totals['completion_tokens']}",
              f"smalltalk_request_latency_seconds_sum {totals['latency_sum']:.6f}",
              f"smalltalk_request_latency_seconds_count {totals['completed']}",
              f"smalltalk_routing_seconds_sum {totals['routing_sum']:.6f}",
              f"smalltalk_resident_experts {totals['resident_experts']}",
              f"smalltalk_expert_loads_total {totals['expert_loads']}",
              f"smalltalk_workers {len(snapshots)}"]
    return "\n".join(lines) + "\n"


ROLES = ("system", "user", "assistant")
_MARKERS = tuple(f"<|{role}|>" for role in ROLES)


def chat_prompt(messages: object) -> str:
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list", "messages")
    parts = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
            raise RequestError(400, "each message needs string 'role' and 'content'", "messages")
        if m["role"] not in ROLES:
            raise RequestError(400, f"role {m['role'][:40]!r} is not one of {', '.join(ROLES)}", "messages")
        if any(marker in m["content"] for marker in _MARKERS):
            raise RequestError(400, "message content may not contain a role marker such as <|user|>", "messages")
        parts.append(f"<|{m['role']}|>\n{m['content']}\n")
    return "".join(parts) + "<|assistant|>\n"


class Cancelled(Exception):
    """The client went away: its generation stops (or never starts)."""


class _StopWhen(StoppingCriteria):
    """A transformers stopping criterion: stop every row once `event` is set."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Engine:
    """Validation, routing and generation; one generation at a time (CPU cores are the bottleneck)."""

    def __init__(self, mixture: SmallTalkMixture, model_name: str, max_tokens_limit: int,
                 max_queue: int = 256) -> None:
        self.mixture, self.model_name, self.max_tokens_limit = mixture, model_name, max_tokens_limit
        self.context = mixture.expert(0).config.max_position_embeddings
        longest = max((len(t) for t in mixture.tokenizer.get_vocab()), default=1)
        self.max_prompt_chars = self.context * max(1, longest)  # longer prompts cannot fit: refused untokenised
        self.lock = threading.Lock()
        self.metrics = Metrics()
        self.max_queue, self.in_flight = max_queue, 0

    def validate(self, body: object, chat: bool) -> dict:
        if not isinstance(body, dict):
            raise RequestError(400, "request body must be a JSON object")
        if body.get("model") not in (self.model_name, None):
            raise RequestError(404, f"model {body.get('model')!r} does not exist; this server has "
                               f"{self.model_name!r}", "model", "model_not_found")
        if chat:
            prompt = chat_prompt(body.get("messages"))
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt.strip():
                raise RequestError(400, "'prompt' must be a non-empty string", "prompt")
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        max_tokens = 16 if max_tokens is None else max_tokens
        limit = self.max_tokens_limit
        if not _is_int(max_tokens) or not 1 <= max_tokens <= limit:
            raise RequestError(400, f"'max_tokens' must be an integer in [1, {limit}]", "max_tokens")
        temperature = 1.0 if body.get("temperature") is None else body["temperature"]
        top_p = 1.0 if body.get("top_p") is None else body["top_p"]
        if not _is_number(temperature) or not 0 <= temperature <= 2:
            raise RequestError(400, "'temperature' must be a number in [0, 2]", "temperature")
        if not _is_number(top_p) or not 0 < top_p <= 1:
            raise RequestError(400, "'top_p' must be a number in (0, 1]", "top_p")
        seed, stream = body.get("seed"), body.get("stream", False)
        if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63):
            raise RequestError(400, "'seed' must be a non-negative integer", "seed")
        if not isinstance(stream, bool):
            raise RequestError(400, "'stream' must be true or false", "stream")
        if len(prompt) > self.max_prompt_chars:
            raise RequestError(400, f"the prompt ({len(prompt)} characters) cannot fit the context of {self.context} "
                               "tokens", "prompt", "context_length_exceeded")
        ids = self.mixture.tokenizer(prompt, return_tensors="pt").input_ids
        if ids.shape[1] < 2:
            raise RequestError(400, "the prompt must be at least 2 tokens long to be routed", "prompt")
        if ids.shape[1] + max_tokens > self.context:
            raise RequestError(400, f"prompt ({ids.shape[1]} tokens) + max_tokens ({max_tokens}) exceeds the "
                               f"context of {self.context} tokens", "max_tokens", "context_length_exceeded")
        return {"ids": ids, "max_tokens": max_tokens, "temperature": float(temperature), "top_p": float(top_p),
                "stream": stream, "seed": seed, "cancel": threading.Event()}

    def route(self, ids: torch.Tensor) -> dict:
        """Routing shares the generation lock: on a few CPU cores, running it beside a generation only
        oversubscribes the cores (measured: 37 ms p50 instead of ~3 ms). routing_ms is the work itself."""
        with self.lock:
            start = time.perf_counter()
            chosen, scores = self.mixture.route(ids)
            seconds = time.perf_counter() - start
        self.metrics.routing_sum += seconds
        return {"expert": int(chosen[0]), "scores": [float(s) for s in scores[0]], "routing_ms": seconds * 1e3}

    def generate(self, req: dict, routing: dict, streamer=None) -> tuple[str, str, int]:
        """(text, finish_reason, completion tokens) with the routed expert; Cancelled once req["cancel"] is
        set (the client left), whether it was still waiting for its turn or already generating."""
        from transformers import StoppingCriteriaList

        cancel = req["cancel"]
        try:
            while not self.lock.acquire(timeout=0.05):
                if cancel.is_set():
                    raise Cancelled()
            try:
                model = self.mixture.expert(routing["expert"])
                if req["seed"] is not None:
                    torch.manual_seed(req["seed"])
                sample = req["temperature"] > 0
                out = model.generate(req["ids"].to(self.mixture.device), max_new_tokens=req["max_tokens"],
                                     do_sample=sample, temperature=req["temperature"] if sample else None,
                                     top_p=req["top_p"] if sample else None, streamer=streamer,
                                     stopping_criteria=StoppingCriteriaList([_StopWhen(cancel)]),
                                     pad_token_id=self.mixture.tokenizer.eos_token_id,
                                     eos_token_id=self.mixture.tokenizer.eos_token_id)
            finally:
                self.lock.release()
        except Cancelled:
            if streamer is not None:
                streamer.end()
            raise
        if cancel.is_set():
            raise Cancelled()
        new = out[0, req["ids"].shape[1]:]
        finish = "stop" if len(new) < req["max_tokens"] else "length"
        return self.mixture.tokenizer.decode(new, skip_special_tokens=True), finish, len(new)


def create_app(mixture: SmallTalkMixture, model_name: str = "smalltalk", api_key: str | None = None,
               max_tokens_limit: int = 512, max_body_bytes: int = 1 << 20, max_queue: int = 256,
               shared_metrics=None):
    """shared_metrics: a serve_workers.SharedMetrics when this app is one of several worker processes."""
    app = FastAPI(title="smalltalk-lm", version="0.1.0")
    engine = Engine(mixture, model_name, max_tokens_limit, max_queue)
    app.state.engine = engine
    if shared_metrics is not None:
        shared_metrics.start(lambda: engine.metrics.snapshot(mixture))

    def error(exc: RequestError, endpoint: str) -> JSONResponse:
        engine.metrics.requests[(endpoint, exc.status)] += 1
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        kind = "invalid_request_error" if exc.status < 500 else "server_busy"
        return JSONResponse({"error": {"message": exc.message, "type": kind, "param": exc.param,
                                       "code": exc.code}}, status_code=exc.status, headers=headers)

    def check_key(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if api_key and not hmac.compare_digest(given, f"Bearer {api_key}".encode()):
            raise RequestError(401, "invalid or missing API key", None, "invalid_api_key")

    async def read_body(request: Request) -> object:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise RequestError(413, f"request body over {max_body_bytes} bytes", None, "request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise RequestError(413, f"request body over {max_body_bytes} bytes", None, "request_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(400, f"request body is not valid JSON: {exc}") from None

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "experts": mixture.num_experts, "resident": mixture.resident_experts,
                "in_flight": engine.in_flight}

    @app.get("/metrics")
    async def metrics(request: Request):
        try:
            check_key(request)
        except RequestError as exc:
            return error(exc, "metrics")
        own = engine.metrics.snapshot(mixture)
        return PlainTextResponse(render_metrics(shared_metrics.gather(own) if shared_metrics else [own]))

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            check_key(request)
        except RequestError as exc:
            return error(exc, "models")
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "smalltalk-lm"}]}

    async def handle(request: Request, chat: bool):
        """A request holds a slot of the queue from its first byte to its last (a slow upload too)."""
        endpoint = "chat" if chat else "completions"
        if engine.in_flight >= engine.max_queue:
            return error(RequestError(503, f"{engine.in_flight} requests in flight; retry shortly", None,
                                      "overloaded"), endpoint)
        engine.in_flight += 1
        streaming = False
        try:
            response = await _answer(request, chat, endpoint)
            streaming = isinstance(response, StreamingResponse)  # its generator frees the slot when done
            return response
        except ClientDisconnect:
            engine.metrics.requests[(endpoint, 499)] += 1
            return JSONResponse({}, status_code=499)  # nobody is listening any more
        finally:
            if not streaming:
                engine.in_flight -= 1

    async def _answer(request: Request, chat: bool, endpoint: str):
        started = time.perf_counter()
        try:
            check_key(request)
            body = await read_body(request)
            req = await asyncio.to_thread(engine.validate, body, chat)  # tokenising off the event loop
            routing = await asyncio.to_thread(engine.route, req["ids"])
        except RequestError as exc:
            return error(exc, endpoint)
        engine.metrics.expert_requests[routing["expert"]] += 1
        engine.metrics.prompt_tokens += int(req["ids"].shape[1])
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if req["stream"]:
            return StreamingResponse(_stream(engine, req, routing, rid, chat, started, endpoint),
                                     media_type="text/event-stream")
        try:
            work = asyncio.to_thread(engine.generate, req, routing)
            text, finish, n_new = await _until_disconnect(request, req, work)
        except Cancelled:
            raise ClientDisconnect() from None
        engine.metrics.completion_tokens += n_new
        engine.metrics.requests[(endpoint, 200)] += 1
        engine.metrics.latency_sum += time.perf_counter() - started
        engine.metrics.completed += 1
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish} if chat
                  else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model_name, "choices": [choice], "smalltalk": routing,
                "usage": {"prompt_tokens": int(req["ids"].shape[1]), "completion_tokens": n_new,
                          "total_tokens": int(req["ids"].shape[1]) + n_new}}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return app


async def _until_disconnect(request: Request, req: dict, work):
    """Await `work`; if the client disconnects meanwhile, cancel the generation and raise Cancelled."""
    task = asyncio.ensure_future(work)
    while not task.done():
        await asyncio.wait({task}, timeout=0.1)
        if not task.done() and await request.is_disconnected():
            req["cancel"].set()
    return await task


async def _stream(engine: Engine, req: dict, routing: dict, rid: str, chat: bool, started: float, endpoint: str):
    """Server-sent events: one chunk per decoded piece, then a final chunk with finish_reason, then [DONE].
    If the client goes away, the response is cancelled here and so is its generation."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(engine.mixture.tokenizer, skip_prompt=True, skip_special_tokens=True)
    task = asyncio.create_task(asyncio.to_thread(engine.generate, req, routing, streamer))
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None) -> str:
        if chat:
            choice = {"index": 0, "delta": {"content": text} if text is not None else {}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        payload = {"id": rid, "object": kind, "created": int(time.time()), "model": engine.model_name,
                   "choices": [choice], "smalltalk": routing}
        return f"data: {json.dumps(payload)}\n\n"

    try:
        if chat:
            yield chunk("", None)
        iterator = iter(streamer)
        while True:
            piece = await asyncio.to_thread(next, iterator, None)
            if piece is None:
                break
            if piece:
                yield chunk(piece, None)
        _, finish, n_new = await task
        engine.metrics.completion_tokens += n_new
        engine.metrics.requests[(endpoint, 200)] += 1
        engine.metrics.latency_sum += time.perf_counter() - started
        engine.metrics.completed += 1
        yield chunk(None, finish)
        yield "data: [DONE]\n\n"
    finally:  # normal end, or the client went away (the response task is cancelled)
        req["cancel"].set()
        engine.in_flight -= 1
        if not task.done():
            task.add_done_callback(lambda t: t.exception())  # a Cancelled generation: nothing to report


def server_settings(run: str, api_key: str | None = None, max_resident: int | None = None,
                    model_name: str = "smalltalk", device: str = "cpu", max_body_bytes: int = 1 << 20,
                    max_queue: int = 256) -> dict:
    """Everything a server process needs to build its app (JSON: it travels to `--workers` processes)."""
    return {"run": run, "api_key": api_key, "max_resident": max_resident, "model_name": model_name,
            "device": device, "max_body_bytes": max_body_bytes, "max_queue": max_queue}


def serve(settings: dict, host: str = "127.0.0.1", port: int = 8000) -> None:
    """One process (`--workers N`: serve_workers.run_workers)."""
    import uvicorn

    uvicorn.run(app_from_settings(settings), host=host, port=port, log_level="warning")


def app_from_settings(settings: dict, shared_metrics=None):
    mixture = SmallTalkMixture.from_pretrained(settings["run"], settings["device"], settings["max_resident"])
    return create_app(mixture, settings["model_name"], settings["api_key"], max_body_bytes=settings["max_body_bytes"],
                      max_queue=settings["max_queue"], shared_metrics=shared_metrics)
