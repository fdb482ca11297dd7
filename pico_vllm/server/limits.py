"""Limits the server puts on its clients before any work: the time to send a request
(``TimedH11Protocol``), a request body's size (``BodyLimit``, ASGI middleware) and a key's request
rate (``TokenBucket``). Admission (queue size, requests in flight per key) is
``ServerState.admit`` in ``state.py``.
"""

from __future__ import annotations

import asyncio
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from pico_vllm.server.errors import error_response
from pico_vllm.server.protocol import APIError

MAX_REQUEST_BYTES = 8 * 1024 * 1024  # a request body's default limit (--max-request-bytes)
REQUEST_READ_TIMEOUT_S = 30.0  # the default of --request-read-timeout


class TimedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with the timeout uvicorn lacks: a client has ``read_timeout``
    seconds, from opening its connection or from the end of its last response, to send a whole
    request (head and body), or it is disconnected. Without it, a client that sends its headers a
    byte at a time (slowloris) or never finishes its body holds its connection forever; each holds
    only its own asyncio task, so others are never blocked, but file descriptors run out.
    (uvicorn's ``timeout_keep_alive`` covers only a connection that sends nothing after a
    response.)"""

    def __init__(self, *args, read_timeout: float = REQUEST_READ_TIMEOUT_S, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.read_timeout = read_timeout
        self.read_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._start_read_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.DONE and self.read_deadline is not None:
            self.read_deadline.cancel()  # the whole request is in: a slow response is no fault of the client

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._start_read_deadline()  # the next request on this connection gets its own time

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.read_deadline is not None:
            self.read_deadline.cancel()

    def _start_read_deadline(self) -> None:
        if self.read_deadline is not None:
            self.read_deadline.cancel()
        if self.conn.their_state is not h11.DONE:  # a pipelined request may already be in
            self.read_deadline = self.loop.call_later(self.read_timeout, self._close_if_unread)

    def _close_if_unread(self) -> None:
        if self.conn.their_state is not h11.DONE and not self.transport.is_closing():
            self.transport.close()


class TokenBucket:
    """``rate`` requests per second with bursts up to ``max(1, rate)``: one bucket per API key."""

    def __init__(self, rate: float) -> None:
        self.rate, self.capacity = rate, max(1.0, rate)
        self.tokens, self.updated = self.capacity, time.monotonic()

    def take(self) -> float:
        """0 if a request may go now, else the seconds until one may."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is a 413, whether its Content-Length
    says so up front or a chunked body grows past it. The body is read here, then handed to the
    app whole (the app's later reads still see a client's disconnect)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = int(dict(scope["headers"]).get(b"content-length", b"0"))
        body = bytearray()
        if declared <= self.limit:
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client left before its body was in: nobody to answer
                body += message.get("body", b"")
                if len(body) > self.limit or not message.get("more_body"):
                    break
        if declared > self.limit or len(body) > self.limit:
            refusal = APIError(413, f"request body is over the server's limit of {self.limit} bytes "
                                    "(--max-request-bytes)")
            return await error_response(refusal, scope["path"])(scope, receive, send)
        delivered = False

        async def replay():
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)
