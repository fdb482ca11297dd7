"""Limits the server puts on its clients before any work: a request body's size (``BodyLimit``,
ASGI middleware) and a key's request rate (``TokenBucket``). Admission (queue size, requests in
flight per key) is ``ServerState.admit`` in ``app.py``.
"""

from __future__ import annotations

import time

from pico_vllm.server.errors import error_response
from pico_vllm.server.protocol import APIError

MAX_REQUEST_BYTES = 8 * 1024 * 1024  # a request body's default limit (--max-request-bytes)


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
