"""The HTTP side of `smalltalk serve`, the same over every engine (serial, batched, remote).

Endpoints: GET /health, GET /metrics (Prometheus text), GET /v1/models, POST /v1/completions,
POST /v1/chat/completions (SSE streaming with "stream": true). Every response carries the routing
decision as "smalltalk": {"expert", "scores", "routing_ms"}. Bad requests get a 4xx JSON error in the
OpenAI shape {"error": {"message", "type", "param", "code"}}; the process never crashes on input.

Hostile clients: bodies over `max_body_bytes` get 413 before they are read in full; a prompt longer than
the context could ever hold is refused before it is tokenised, and tokenisation runs off the event loop
(/health keeps answering); every field is type-checked (4xx, never 500); the API key (SMALLTALK_API_KEY,
--api-key-file) is compared in constant time and also guards /metrics; a client that disconnects cancels
its generation, queued or running; beyond `max_queue` requests in flight the answer is 503 + Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import sys
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.requests import ClientDisconnect

from smalltalk.serving.engine import Engine
from smalltalk.serving.logprobs import StreamedChoice, choice_logprobs, prompt_text
from smalltalk.serving.metrics import render_metrics
from smalltalk.serving.protocol import Cancelled, RequestError
from smalltalk.untrusted import BadInput, parse_json


class _WorkerHeader:
    """Every answer says which server process gave it (`X-Smalltalk-Worker: PID`): with --workers N, what a
    client or a test needs to tell the workers apart. Plain ASGI, so streams and disconnects pass untouched."""

    def __init__(self, app, worker: bytes) -> None:
        self.app, self.worker = app, worker

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_named(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-smalltalk-worker", self.worker)]}
            await send(message)

        return await self.app(scope, receive, send_named)


def create_app(engine: Engine, api_key: str | None = None, max_body_bytes: int = 1 << 20, shared_metrics=None,
               client_timeout: float = 30.0, request_timeout: float = 600.0):
    """shared_metrics: a workers.SharedMetrics when this app is one of several worker processes.
    client_timeout: the longest wait for a client to send its body or take the next chunk of a stream;
    request_timeout: the longest a request may take from its first byte to its last (its generation is
    cancelled then), so neither a slow upload nor an unread stream holds a slot of the queue for long."""
    if api_key is not None and not api_key:
        raise ValueError("an empty API key would turn authentication off; pass None for no key")
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        # every request in flight may park a thread in engine.route / engine.generate (waiting, not working):
        # asyncio's default pool (cores + 4 threads) would cap concurrent generations at that, not the batch
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(engine.max_queue + 8, "smalltalk-request"))
        yield
        engine.close()  # the batching loop's thread, the backends' HTTP client

    app = FastAPI(title="smalltalk-lm", version="0.1.0", lifespan=lifespan)
    app.state.engine = engine
    app.add_middleware(_WorkerHeader, worker=str(os.getpid()).encode())
    if shared_metrics is not None:
        shared_metrics.start(lambda: engine.metrics.snapshot(engine.gauges()))

    def check_key(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if api_key and not hmac.compare_digest(given, f"Bearer {api_key}".encode()):
            raise RequestError(401, "invalid or missing API key", None, "invalid_api_key")

    def refused(request: Request, endpoint: str) -> JSONResponse | None:
        """The 401 answer of a GET endpoint behind the key, or None when the key is right."""
        try:
            check_key(request)
        except RequestError as exc:
            return _error(engine, exc, endpoint)
        return None

    @app.get("/health")
    async def health() -> dict:
        """Unauthenticated (load balancers probe it): counts only, never a backend's URL or a path."""
        return {"status": "ok", **engine.health(), "in_flight": engine.in_flight}

    @app.get("/metrics")
    async def metrics(request: Request):
        if (denied := refused(request, "metrics")) is not None:
            return denied
        own = engine.metrics.snapshot(engine.gauges())
        return PlainTextResponse(render_metrics(shared_metrics.gather(own) if shared_metrics else [own]))

    @app.get("/v1/models")
    async def models(request: Request):
        if (denied := refused(request, "models")) is not None:
            return denied
        return {"object": "list", "data": [{"id": engine.model_name, "object": "model", "created": 0,
                                            "owned_by": "smalltalk-lm"}]}

    async def handle(request: Request, chat: bool):
        """A request holds a slot of the queue from its first byte to its last (a slow upload too)."""
        endpoint = "chat" if chat else "completions"
        if engine.in_flight >= engine.max_queue:
            return _error(engine, RequestError(503, f"{engine.in_flight} requests in flight; retry shortly", None,
                                               "overloaded"), endpoint)
        engine.in_flight += 1
        streaming = False
        deadline = time.monotonic() + request_timeout
        try:
            check_key(request)
            body = await _read_body(request, max_body_bytes, min(client_timeout, request_timeout))
            response = await _answer(engine, request, body, chat, endpoint, deadline)
            streaming = isinstance(response, StreamingResponse)  # its generator frees the slot when done
            return response
        except RequestError as exc:
            return _error(engine, exc, endpoint)
        except ClientDisconnect:
            engine.metrics.requests[(endpoint, 499)] += 1
            return JSONResponse({}, status_code=499)  # nobody is listening any more
        except Exception as exc:  # noqa: BLE001 - a bug of ours: a JSON 500, counted, logged; never plain text
            traceback.print_exc(file=sys.stderr)
            return _error(engine, RequestError(500, f"internal error: {type(exc).__name__}", None, "internal_error"),
                          endpoint)
        finally:
            if not streaming:
                engine.in_flight -= 1

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return _StalledClients(app, engine, client_timeout)


class _StalledClients:
    """ASGI wrapper: a client that does not take the next piece of its response within `seconds` (an unread
    stream: the socket's buffer is full and sending blocks) is dropped, which ends its generation and frees
    its slot. Counted as status 408 of its endpoint."""

    def __init__(self, app, engine: Engine, seconds: float) -> None:
        self.app, self.engine, self.seconds = app, engine, seconds
        self.state = app.state  # tests and uvicorn reach the engine through app.state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        stalled = False

        async def timed_send(message) -> None:
            nonlocal stalled
            try:
                await asyncio.wait_for(send(message), self.seconds)
            except asyncio.TimeoutError:
                stalled = True
                raise _Stalled() from None

        try:
            await self.app(scope, receive, timed_send)
        except _Stalled:
            pass
        except BaseException:
            if not stalled:
                raise
        if stalled:
            endpoint = "chat" if scope["path"].endswith("/chat/completions") else "completions"
            self.engine.metrics.requests[(endpoint, 408)] += 1


class _Stalled(Exception):
    """The client stopped reading its response."""


def _error(engine: Engine, exc: RequestError, endpoint: str) -> JSONResponse:
    engine.metrics.requests[(endpoint, exc.status)] += 1
    headers = {"Retry-After": "1"} if exc.status == 503 else None
    return JSONResponse(_error_body(exc), status_code=exc.status, headers=headers)


def _error_body(exc: RequestError) -> dict:
    kind = "invalid_request_error" if exc.status < 500 else "server_error"
    return {"error": {"message": exc.message, "type": kind, "param": exc.param, "code": exc.code}}


async def _read_body(request: Request, max_body_bytes: int, timeout: float) -> object:
    """The parsed body: 413 past `max_body_bytes`, 408 if it takes over `timeout` seconds to arrive, 400 for
    anything untrusted.parse_json refuses (deep nesting, huge integers, NaN, lone surrogates)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_body_bytes:
        raise RequestError(413, f"request body over {max_body_bytes} bytes", None, "request_too_large")
    chunks, size = [], 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise RequestError(413, f"request body over {max_body_bytes} bytes", None, "request_too_large")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise RequestError(408, f"the request body did not arrive within {timeout:g} s", None,
                           "request_timeout") from None
    try:
        return parse_json(b"".join(chunks))
    except BadInput as exc:
        raise RequestError(400, f"request body is not valid JSON: {exc}") from None


def _choices(req: dict) -> list[dict]:
    """The request's completions, in OpenAI's order (prompt by prompt, n samples each, sample i seeded
    seed + i): each a request of its own for the engine, all sharing the client's cancel event."""
    out = []
    for p, prompt in enumerate(req["prompts"]):
        for i in range(req["n"]):
            seed = None if req["seed"] is None else req["seed"] + i
            out.append({**req, **prompt, "seed": seed, "index": p * req["n"] + i, "prompt_index": p})
    return out


async def _answer(engine: Engine, request: Request, body: object, chat: bool, endpoint: str, deadline: float):
    started = time.perf_counter()
    req = await asyncio.to_thread(engine.validate, body, chat)  # tokenising off the event loop
    req["deadline"] = deadline
    firsts = [{**req, **prompt} for prompt in req["prompts"]]  # each prompt is routed once, on its own
    try:
        routings = await _until_disconnect(request, req, asyncio.gather(
            *[asyncio.to_thread(engine.route, first) for first in firsts]))
    except Cancelled:
        raise ClientDisconnect() from None
    for routing, first in zip(routings, firsts, strict=True):
        engine.metrics.expert_requests[routing["expert"]] += 1
        engine.metrics.prompt_tokens += int(first["ids"].shape[1])
    choices = _choices(req)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    if req["stream"]:
        return StreamingResponse(_stream(engine, req, choices, routings, rid, chat, started, endpoint),
                                 media_type="text/event-stream")
    try:
        results = await _until_disconnect(request, req, asyncio.gather(
            *[asyncio.to_thread(engine.generate, c, routings[c["prompt_index"]]) for c in choices]))
    except Cancelled:
        raise ClientDisconnect() from None
    n_new = sum(r[2] for r in results)
    engine.metrics.finished(endpoint, n_new, time.perf_counter() - started)
    answers = []
    tokenizer = engine.validator.tokenizer
    for c, (text, finish, _) in zip(choices, results, strict=True):
        if c["echo"]:  # the prompt, then the completion; log-probs of both
            text = prompt_text(tokenizer, c) + text
        logprobs = choice_logprobs(tokenizer, c, chat, len(text) if c["stop"] else None)
        answer = ({"index": c["index"], "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                   "logprobs": logprobs} if chat else
                  {"index": c["index"], "text": text, "finish_reason": finish, "logprobs": logprobs})
        if len(routings) > 1:  # a batch of prompts: each choice says where its prompt went
            answer["smalltalk"] = routings[c["prompt_index"]]
        answers.append(answer)
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": engine.model_name, "choices": answers, "smalltalk": routings[0], "usage": _usage(req, n_new)}


def _usage(req: dict, n_new: int) -> dict:
    prompt = sum(int(p["ids"].shape[1]) for p in req["prompts"])
    return {"prompt_tokens": prompt, "completion_tokens": n_new, "total_tokens": prompt + n_new}


async def _until_disconnect(request: Request, req: dict, work):
    """Await `work`; if the client disconnects meanwhile, cancel the request and raise Cancelled; past the
    request's deadline, cancel it and answer 504."""
    task = asyncio.ensure_future(work)
    while not task.done():
        await asyncio.wait({task}, timeout=0.1)
        if not task.done() and time.monotonic() > req["deadline"]:
            req["cancel"].set()
        elif not task.done() and await request.is_disconnected():
            req["cancel"].set()
    try:
        return await task
    except Cancelled:
        if time.monotonic() >= req["deadline"]:
            raise RequestError(504, "the request ran past the server's --request-timeout and was cancelled", None,
                               "request_timeout") from None
        raise


async def _stream(engine: Engine, req: dict, choices: list[dict], routings: list[dict], rid: str, chat: bool,
                  started: float, endpoint: str):
    """Server-sent events: one chunk per decoded piece of any choice (its `index` says which), a chunk with
    its finish_reason as each choice ends, the usage if stream_options.include_usage, then [DONE]. A failure
    after the first byte is sent as an error event. If the client goes away, the response is cancelled here
    and so are its generations."""
    loop, pieces = asyncio.get_running_loop(), asyncio.Queue()

    def start(c: dict):
        task = asyncio.ensure_future(asyncio.to_thread(
            engine.generate, c, routings[c["prompt_index"]],
            lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, (c["index"], piece))))
        task.add_done_callback(lambda _: pieces.put_nowait((c["index"], None)))
        return task

    tasks = {c["index"]: start(c) for c in choices}
    sent = {c["index"]: StreamedChoice(engine.validator.tokenizer, c, chat) for c in choices}
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index: int, text: str | None, finish: str | None, logprobs: dict | None = None, **extra) -> str:
        if chat:
            choice = {"index": index, "delta": {"content": text} if text is not None else {}, "finish_reason": finish}
            if logprobs is not None:
                choice["logprobs"] = logprobs
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        routing = routings[choices[index]["prompt_index"]] if index < len(choices) else routings[0]
        payload = {"id": rid, "object": kind, "created": int(time.time()), "model": engine.model_name,
                   "choices": [choice], "smalltalk": routing, **extra}
        return f"data: {json.dumps(payload)}\n\n"

    try:
        if chat:
            for c in choices:
                yield chunk(c["index"], "", None)
        open_choices, n_new = set(tasks), 0
        while open_choices:
            try:
                index, piece = await asyncio.wait_for(pieces.get(), max(req["deadline"] - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                req["cancel"].set()
                engine.metrics.requests[(endpoint, 504)] += 1
                late = RequestError(504, "the request ran past the server's --request-timeout and was cancelled",
                                    None, "request_timeout")
                yield f"data: {json.dumps(_error_body(late))}\n\n"
                return
            if piece is not None:
                text, logprobs = sent[index].piece(piece)
                yield chunk(index, text, None, logprobs)
                continue
            open_choices.discard(index)
            try:
                _, finish, count = await tasks[index]
            except Cancelled:
                return  # the client left (or the deadline passed): nobody to tell
            except Exception as exc:  # noqa: BLE001 - after the first byte an error can only be an event
                if not isinstance(exc, RequestError):
                    traceback.print_exc(file=sys.stderr)
                    exc = RequestError(500, f"internal error: {type(exc).__name__}", None, "internal_error")
                engine.metrics.requests[(endpoint, exc.status)] += 1
                yield f"data: {json.dumps(_error_body(exc))}\n\n"
                return
            n_new += count
            text, logprobs = sent[index].final()
            yield chunk(index, text or None, finish, logprobs)
        engine.metrics.finished(endpoint, n_new, time.perf_counter() - started)
        if req["include_usage"]:
            yield f"data: {json.dumps({'id': rid, 'object': kind, 'choices': [], 'usage': _usage(req, n_new)})}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # normal end, or the client went away (the response task is cancelled)
        req["cancel"].set()
        engine.in_flight -= 1
        for task in tasks.values():
            if not task.done():
                task.add_done_callback(lambda t: t.exception())  # a Cancelled generation: nothing to report
