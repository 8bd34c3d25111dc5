"""Settings, the engine they choose, and uvicorn: what `smalltalk serve` and each `--workers` process run."""

from __future__ import annotations

import os

from smalltalk.errors import SmalltalkError
from smalltalk.mixture.model import SmallTalkMixture
from smalltalk.serving.engine import Engine

ENGINES = ("batched", "serial", "openai")


def server_settings(run: str, api_key: str | None = None, max_resident: int | None = None,
                    model_name: str = "smalltalk", device: str = "cpu", max_body_bytes: int = 1 << 20,
                    max_queue: int = 256, engine: str = "batched", max_batch: int = 64,
                    expert: int | None = None, expert_urls: dict[int, str] | None = None,
                    backend_api_key: str | None = None, max_tokens_limit: int = 512, client_timeout: float = 30.0,
                    request_timeout: float = 600.0, max_connections: int | None = None) -> dict:
    """Everything a server process needs to build its app (JSON: it travels to `--workers` processes).
    max_connections: open connections before uvicorn answers 503 (default: max_queue + 64, so /health and
    /metrics still get through when the queue is full)."""
    if max_batch < 1 or max_queue < 1 or client_timeout <= 0 or request_timeout <= 0:
        raise SmalltalkError("--max-batch and --max-queue must be at least 1, the timeouts positive")
    if api_key is not None and not api_key:
        raise SmalltalkError("the API key is empty, which would turn authentication off",
                             fix="give a non-empty key, or unset SMALLTALK_API_KEY to serve without one")
    return {"run": run, "api_key": api_key, "max_resident": max_resident, "model_name": model_name,
            "device": device, "max_body_bytes": max_body_bytes, "max_queue": max_queue, "engine": engine,
            "max_batch": max_batch, "expert": expert, "backend_api_key": backend_api_key,
            "expert_urls": {str(k): u for k, u in (expert_urls or {}).items()}, "max_tokens_limit": max_tokens_limit,
            "client_timeout": client_timeout, "request_timeout": request_timeout,
            "max_connections": max_connections or max_queue + 64}


def build_engine(settings: dict) -> Engine:
    mixture = SmallTalkMixture.from_pretrained(settings["run"], settings["device"], settings["max_resident"])
    name, limit, queue = settings["model_name"], settings["max_tokens_limit"], settings["max_queue"]
    if settings["engine"] == "openai":
        from smalltalk.serving.remote import RemoteEngine

        urls = {int(k): u for k, u in settings["expert_urls"].items()}
        return RemoteEngine(mixture, urls, name, limit, queue, settings["backend_api_key"])
    if settings["engine"] == "serial":
        from smalltalk.serving.serial import SerialEngine

        return SerialEngine(mixture, name, limit, queue)
    from smalltalk.serving.batching import BatchedEngine

    return BatchedEngine(mixture, name, limit, queue, settings["max_batch"], settings["expert"])


def app_from_settings(settings: dict, shared_metrics=None):
    from smalltalk.serving.app import create_app

    return create_app(build_engine(settings), settings["api_key"], settings["max_body_bytes"], shared_metrics,
                      settings["client_timeout"], settings["request_timeout"])


def uvicorn_options(settings: dict) -> dict:
    """Connection limits: uvicorn alone waits forever for a new connection's headers (a slow-header client
    holds a socket), so `serving.connection.HeaderDeadline` closes a connection whose headers are not in
    after client_timeout; beyond max_connections open connections uvicorn answers 503 itself."""
    from smalltalk.serving.connection import TIMEOUT_ENV

    os.environ[TIMEOUT_ENV] = str(settings["client_timeout"])
    return {"http": "smalltalk.serving.connection:HeaderDeadline", "limit_concurrency": settings["max_connections"],
            "timeout_keep_alive": 5, "log_level": "warning"}


def serve(settings: dict, host: str = "127.0.0.1", port: int = 8000) -> None:
    """One process (`--workers N`: workers.run_workers)."""
    import uvicorn

    uvicorn.run(app_from_settings(settings), host=host, port=port, **uvicorn_options(settings))
