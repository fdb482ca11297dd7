"""What the routes share: the engines by name, the metrics, and the checks every request passes
(shutdown, API key, rate, admission). One ``ServerState`` per app, at ``app.state.server``.
"""

from __future__ import annotations

import hmac
import math
from dataclasses import dataclass, field

from fastapi import Request

from pico_vllm.server.async_engine import AsyncEngine
from pico_vllm.server.limits import TokenBucket
from pico_vllm.server.metrics import Metrics
from pico_vllm.server.protocol import APIError


@dataclass
class ServerState:
    """The engines (the first is the default model) and the limits of one server. ``closing``
    turns true when the server drains: new requests then get 503."""

    engines: list[AsyncEngine]
    api_key: str | None = None
    max_queue: int = 256
    rate_limit: float | None = None
    max_per_client: int | None = None
    closing: bool = False
    metrics: Metrics = field(init=False)
    buckets: dict[str, TokenBucket] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.engines)
        self.by_name = {engine.name: engine for engine in self.engines}

    def engine_for(self, model: str | None) -> AsyncEngine:
        """The engine serving ``model``: 404 for a model not served, 400 for none among several."""
        if model is None:  # fine with one model; with several, which one must be said
            if len(self.engines) > 1:
                raise APIError(400, f"model is required when several models are served: "
                                    f"{', '.join(self.by_name)}", param="model")
            return self.engines[0]
        if model not in self.by_name:
            raise APIError(404, f"model {model!r} is not served here; models: {', '.join(self.by_name)}",
                           "not_found_error", "model")
        return self.by_name[model]

    def check_engines_run(self) -> None:
        """503 naming why, once an engine's thread has stopped."""
        stopped = "; ".join(filter(None, (engine.failure_message() for engine in self.engines)))
        if stopped:
            raise APIError(503, stopped, "server_error")

    def check_client(self, request: Request) -> None:
        """Shutdown (503), a stopped engine (503), API key (401) and per-key rate (429); records
        the client (its key, or its address without keys) in ``request.state.client``."""
        if self.closing:
            raise APIError(503, "server is shutting down", "server_error")
        self.check_engines_run()
        # OpenAI's clients send `Authorization: Bearer KEY`, Anthropic's `x-api-key: KEY`.
        key = request.headers.get("authorization", "") or f"Bearer {request.headers.get('x-api-key', '')}"
        # In constant time: how long a wrong key takes to refuse says nothing about the right one.
        if self.api_key and not hmac.compare_digest(key.encode(), f"Bearer {self.api_key}".encode()):
            raise APIError(401, "missing or wrong API key", "authentication_error")
        address = request.client.host if request.client else ""
        request.state.client = key if self.api_key else address
        if self.rate_limit and request.method == "POST":
            wait = self.buckets.setdefault(key or address, TokenBucket(self.rate_limit)).take()
            if wait:
                self.metrics.rejected.labels("rate_limit").inc()
                raise APIError(429, f"rate limit of {self.rate_limit:g} requests/s exceeded",
                               "rate_limit_error", headers={"Retry-After": str(math.ceil(wait))})

    def admit(self, engine: AsyncEngine, n: int, request: Request) -> None:
        """429 unless ``n`` more requests fit the client's limit and ``engine``'s queue. Call it
        right before submission, with no await between: concurrent requests are then counted one
        by one (an await there let a burst all pass the check)."""
        client = request.state.client
        if self.max_per_client and sum(e.requests_of(client) for e in self.engines) + n > self.max_per_client:
            self.metrics.rejected.labels("client_limit").inc()
            raise APIError(429, f"this {'API key' if self.api_key else 'client'} already has requests in "
                                f"flight (at most {self.max_per_client}: --max-concurrent-per-key)",
                           "rate_limit_error", headers={"Retry-After": "1"})
        if engine.num_requests + n > self.max_queue:
            self.metrics.rejected.labels("queue_full").inc()
            raise APIError(429, f"server is at capacity ({self.max_queue} requests); retry shortly",
                           "rate_limit_error", headers={"Retry-After": "1"})


def server_state(request: Request) -> ServerState:
    """The app's ``ServerState`` (a FastAPI dependency)."""
    return request.app.state.server


def check_client(request: Request) -> None:
    """The guard of every route but /health and /metrics. A dependency, not a middleware:
    Starlette's ``BaseHTTPMiddleware`` hides a client's disconnect from ``is_disconnected()``."""
    server_state(request).check_client(request)
