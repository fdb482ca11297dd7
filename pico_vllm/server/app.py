"""The OpenAI-compatible HTTP API (FastAPI): completions, chat completions, Anthropic's messages,
models, tokenize, health and metrics.

Each model has its own :class:`AsyncEngine` (thread, KV pool); a request is routed by its
``model`` field. Streams are server-sent events ending in ``data: [DONE]``; a client that goes
away aborts its request at once (its blocks are freed). Errors come back in OpenAI's shape
(``errors.py``): 400 for invalid input (never FastAPI's 422), 401 for a missing or wrong API key,
404 for an unknown model or route, 405 for a wrong method, 413 for a body over the limit, 429 when
the queue is full or a key is over its rate or its requests in flight, 503 while the server shuts
down or once an engine has stopped.

The pieces: ``routes.py`` (one function per route), ``state.py`` (engines, limits and the checks
every request passes), ``limits.py`` (body size, rate), ``errors.py`` (error shapes),
``responses.py`` (answering a generation request, streamed or not).
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from pico_vllm.server.async_engine import AsyncEngine
from pico_vllm.server.errors import install_error_handlers
from pico_vllm.server.limits import MAX_REQUEST_BYTES, BodyLimit
from pico_vllm.server.routes import guarded_routes, open_routes
from pico_vllm.server.state import ServerState


def create_app(
    engines: list[AsyncEngine], api_key: str | None = None, max_queue: int = 256,
    rate_limit: float | None = None, max_request_bytes: int = MAX_REQUEST_BYTES,
    allowed_origins: list[str] | None = None, max_per_client: int | None = None,
) -> FastAPI:
    """The app serving ``engines`` (the first is the default model). Browsers on other origins
    may call it only from ``allowed_origins`` (CORS; none by default); one API key (or, without
    keys, one client address) has at most ``max_per_client`` requests in flight. The app's
    ``ServerState`` is ``app.state.server``."""
    server = ServerState(engines, api_key, max_queue, rate_limit, max_per_client)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        server.closing = True  # uvicorn is draining: new requests get 503

    app = FastAPI(title="pico-vllm", lifespan=lifespan)
    app.state.server = server
    app.add_middleware(BodyLimit, limit=max_request_bytes)
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type", "x-api-key"])
    install_error_handlers(app)
    app.include_router(open_routes)
    app.include_router(guarded_routes)
    return app
