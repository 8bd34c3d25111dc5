"""What the HTTP app asks of an engine: validate a body, route a request, generate its completion.

Every engine offers the same three calls, each blocking (the app runs them off the event loop):
`validate(body, chat)` -> request dict, `route(req)` -> {"expert", "scores", "routing_ms"} and
`generate(req, routing, on_text)` -> (text, finish_reason, completion tokens), calling `on_text(piece)`
as text arrives (streaming) and raising Cancelled once req["cancel"] is set (the client left).
"""

from __future__ import annotations

import abc
import threading
import time
from collections.abc import Callable

from smalltalk.serving.metrics import Metrics
from smalltalk.serving.protocol import Validator

OnText = Callable[[str], None] | None


class Engine(abc.ABC):
    """The interface; SerialEngine, BatchedEngine and RemoteEngine implement route and generate."""

    def __init__(self, validator: Validator, max_queue: int = 256) -> None:
        self.validator, self.model_name = validator, validator.model_name
        self.metrics = Metrics()
        self.max_queue, self.in_flight = max_queue, 0

    def validate(self, body: object, chat: bool) -> dict:
        return self.validator(body, chat)

    @abc.abstractmethod
    def route(self, req: dict) -> dict: ...

    @abc.abstractmethod
    def generate(self, req: dict, routing: dict, on_text: OnText = None) -> tuple[str, str, int]: ...

    def gauges(self) -> dict:
        """Point-in-time values for /metrics (summed over `--workers` processes)."""
        return {"resident_experts": 0, "expert_loads": 0, "batched_rows": 0}

    def health(self) -> dict:
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook: engines without background work keep this
        """Stop background work (the batching loop, HTTP clients)."""


class RoutesEachPrompt(Engine):
    """route() for engines that score each prompt on its own (serial, remote): under one lock, since the
    routers' forward is shared, and counted in the metrics. The batched engine routes its queue in batches."""

    def __init__(self, validator: Validator, mixture, max_queue: int = 256) -> None:
        super().__init__(validator, max_queue)
        self.mixture = mixture
        self._route_lock = threading.Lock()

    def route(self, req: dict) -> dict:
        with self._route_lock:
            start = time.perf_counter()
            chosen, scores = self.mixture.route(req["route_ids"])
            seconds = time.perf_counter() - start
        self.metrics.routing_sum += seconds
        return {"expert": int(chosen[0]), "scores": [float(s) for s in scores[0]], "routing_ms": seconds * 1e3}
