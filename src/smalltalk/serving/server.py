"""Settings, the engine they choose, and uvicorn: what `smalltalk serve` and each `--workers` process run."""

from __future__ import annotations

from smalltalk.mixture import SmallTalkMixture
from smalltalk.serving.engine import Engine

ENGINES = ("batched", "serial", "openai")


def server_settings(run: str, api_key: str | None = None, max_resident: int | None = None,
                    model_name: str = "smalltalk", device: str = "cpu", max_body_bytes: int = 1 << 20,
                    max_queue: int = 256, engine: str = "batched", max_batch: int = 64,
                    expert: int | None = None, expert_urls: dict[int, str] | None = None,
                    backend_api_key: str | None = None, max_tokens_limit: int = 512) -> dict:
    """Everything a server process needs to build its app (JSON: it travels to `--workers` processes)."""
    return {"run": run, "api_key": api_key, "max_resident": max_resident, "model_name": model_name,
            "device": device, "max_body_bytes": max_body_bytes, "max_queue": max_queue, "engine": engine,
            "max_batch": max_batch, "expert": expert, "backend_api_key": backend_api_key,
            "expert_urls": {str(k): u for k, u in (expert_urls or {}).items()}, "max_tokens_limit": max_tokens_limit}


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

    return create_app(build_engine(settings), settings["api_key"], settings["max_body_bytes"], shared_metrics)


def serve(settings: dict, host: str = "127.0.0.1", port: int = 8000) -> None:
    """One process (`--workers N`: workers.run_workers)."""
    import uvicorn

    uvicorn.run(app_from_settings(settings), host=host, port=port, log_level="warning")
