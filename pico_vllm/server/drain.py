"""Graceful shutdown: uvicorn's server with a drain phase in front of its own shutdown.

The first SIGINT or SIGTERM starts the drain: new requests get 503 (``/health`` and ``/metrics``
still answer) while the requests in flight run to their end. After ``timeout`` seconds the
engines abort what still runs: each request ends with finish_reason "abort" (a stream still gets
its finish chunk and ``data: [DONE]``). Once no request is left, uvicorn's own shutdown runs: it
stops listening, waits briefly for responses still being written, and cancels the rest. A second
signal skips the drain. The signal is not re-raised afterwards (uvicorn would), so the process
exits 0.

An engine whose thread has died (``AsyncEngine.failure``) stops the server the same way, with
``exit_code`` 1, so that a supervisor restarts it; ``/health`` answers 503 meanwhile.
"""

from __future__ import annotations

import sys
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from pico_vllm.server.async_engine import AsyncEngine

ABORT_GRACE_S = 10.0  # after the drain time, how long the aborted requests get to wind down


class DrainingServer(uvicorn.Server):
    """``uvicorn.Server`` for ``app`` whose first exit signal drains ``engines`` for up to ``timeout`` s."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, engines: list[AsyncEngine],
                 timeout: float) -> None:
        super().__init__(config)
        self.app, self.engines, self.timeout = app, engines, timeout
        self.drain_deadline: float | None = None
        self.aborted = False
        self.exit_code = 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_deadline is None:
            self.app.state.server.closing = True
            self.drain_deadline = time.monotonic() + self.timeout
            in_flight = sum(engine.num_requests for engine in self.engines)
            print(f"[pico-vllm] shutting down: new requests get 503; draining {in_flight} request(s) "
                  f"in flight for up to {self.timeout:g} s (--shutdown-timeout); signal again "
                  "(Ctrl-C) to stop now", file=sys.stderr, flush=True)
        elif self.should_exit:
            self.force_exit = True  # a third signal: stop waiting for connections too
        else:
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        stopped = [engine.failure_message() for engine in self.engines if engine.failure is not None]
        if stopped and not self.exit_code:
            self.exit_code = 1
            print(f"[pico-vllm] {'; '.join(stopped)}; exiting 1", file=sys.stderr, flush=True)
            self.handle_exit(0, None)  # drain what the other engines still run
        if self.drain_deadline is not None and not self.should_exit:
            self.should_exit = sum(engine.num_requests for engine in self.engines) == 0
            if time.monotonic() >= self.drain_deadline and not self.aborted:
                self.aborted = True
                for engine in self.engines:
                    engine.abort_all()
            # The abort takes at most a step; should a step hang, stop waiting anyway.
            self.should_exit |= time.monotonic() >= self.drain_deadline + ABORT_GRACE_S
        return await super().on_tick(counter)
