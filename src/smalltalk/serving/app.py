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
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.requests import ClientDisconnect

from smalltalk.serving.engine import Engine
from smalltalk.serving.metrics import render_metrics
from smalltalk.serving.protocol import Cancelled, RequestError


def create_app(engine: Engine, api_key: str | None = None, max_body_bytes: int = 1 << 20, shared_metrics=None):
    """shared_metrics: a workers.SharedMetrics when this app is one of several worker processes."""
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        # every request in flight may park a thread in engine.route / engine.generate (waiting, not working):
        # asyncio's default pool (cores + 4 threads) would cap concurrent generations at that, not the batch
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(engine.max_queue + 8, "smalltalk-request"))
        yield
        engine.close()  # the batching loop's thread, the backends' HTTP client

    app = FastAPI(title="smalltalk-lm", version="0.1.0", lifespan=lifespan)
    app.state.engine = engine
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
        try:
            check_key(request)
            response = await _answer(engine, request, await _read_body(request, max_body_bytes), chat, endpoint)
            streaming = isinstance(response, StreamingResponse)  # its generator frees the slot when done
            return response
        except RequestError as exc:
            return _error(engine, exc, endpoint)
        except ClientDisconnect:
            engine.metrics.requests[(endpoint, 499)] += 1
            return JSONResponse({}, status_code=499)  # nobody is listening any more
        finally:
            if not streaming:
                engine.in_flight -= 1

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return app


def _error(engine: Engine, exc: RequestError, endpoint: str) -> JSONResponse:
    engine.metrics.requests[(endpoint, exc.status)] += 1
    headers = {"Retry-After": "1"} if exc.status == 503 else None
    return JSONResponse(_error_body(exc), status_code=exc.status, headers=headers)


def _error_body(exc: RequestError) -> dict:
    kind = "invalid_request_error" if exc.status < 500 else "server_error"
    return {"error": {"message": exc.message, "type": kind, "param": exc.param, "code": exc.code}}


async def _read_body(request: Request, max_body_bytes: int) -> object:
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


async def _answer(engine: Engine, request: Request, body: object, chat: bool, endpoint: str):
    started = time.perf_counter()
    req = await asyncio.to_thread(engine.validate, body, chat)  # tokenising off the event loop
    try:
        routing = await _until_disconnect(request, req, asyncio.to_thread(engine.route, req))
    except Cancelled:
        raise ClientDisconnect() from None
    engine.metrics.expert_requests[routing["expert"]] += 1
    engine.metrics.prompt_tokens += int(req["ids"].shape[1])
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    if req["stream"]:
        return StreamingResponse(_stream(engine, req, routing, rid, chat, started, endpoint),
                                 media_type="text/event-stream")
    try:
        text, finish, n_new = await _until_disconnect(request, req, asyncio.to_thread(engine.generate, req, routing))
    except Cancelled:
        raise ClientDisconnect() from None
    engine.metrics.finished(endpoint, n_new, time.perf_counter() - started)
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish} if chat
              else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": engine.model_name, "choices": [choice], "smalltalk": routing, "usage": _usage(req, n_new)}


def _usage(req: dict, n_new: int) -> dict:
    prompt = int(req["ids"].shape[1])
    return {"prompt_tokens": prompt, "completion_tokens": n_new, "total_tokens": prompt + n_new}


async def _until_disconnect(request: Request, req: dict, work):
    """Await `work`; if the client disconnects meanwhile, cancel the request and raise Cancelled."""
    task = asyncio.ensure_future(work)
    while not task.done():
        await asyncio.wait({task}, timeout=0.1)
        if not task.done() and await request.is_disconnected():
            req["cancel"].set()
    return await task


async def _stream(engine: Engine, req: dict, routing: dict, rid: str, chat: bool, started: float, endpoint: str):
    """Server-sent events: one chunk per decoded piece, then a final chunk with finish_reason, the usage
    if stream_options.include_usage, then [DONE]. A failure after the first byte is sent as an error
    event. If the client goes away, the response is cancelled here and so is its generation."""
    loop, pieces = asyncio.get_running_loop(), asyncio.Queue()
    task = asyncio.ensure_future(asyncio.to_thread(
        engine.generate, req, routing, lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece)))
    task.add_done_callback(lambda _: pieces.put_nowait(None))
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None, **extra) -> str:
        if chat:
            choice = {"index": 0, "delta": {"content": text} if text is not None else {}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        payload = {"id": rid, "object": kind, "created": int(time.time()), "model": engine.model_name,
                   "choices": [choice], "smalltalk": routing, **extra}
        return f"data: {json.dumps(payload)}\n\n"

    try:
        if chat:
            yield chunk("", None)
        while (piece := await pieces.get()) is not None:
            yield chunk(piece, None)
        try:
            _, finish, n_new = await task
        except RequestError as exc:
            engine.metrics.requests[(endpoint, exc.status)] += 1
            yield f"data: {json.dumps(_error_body(exc))}\n\n"
            return
        engine.metrics.finished(endpoint, n_new, time.perf_counter() - started)
        yield chunk(None, finish)
        if req["include_usage"]:
            yield f"data: {json.dumps({'id': rid, 'object': kind, 'choices': [], 'usage': _usage(req, n_new)})}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # normal end, or the client went away (the response task is cancelled)
        req["cancel"].set()
        engine.in_flight -= 1
        if not task.done():
            task.add_done_callback(lambda t: t.exception())  # a Cancelled generation: nothing to report
