"""One engine thread per model, and the asyncio side that talks to it.

MLX streams belong to the thread that made them, so the ``LLMEngine`` is created on its own
thread and every step runs there; the weights are loaded (and evaluated) by the caller first, so
a bad ``--model`` fails where the server starts. The thread is not a daemon: a daemon thread that
had run the model made the process abort at exit ("terminate called without an active
exception", MLX 0.32 on Linux). It stops on ``shutdown()``, or by itself within half a second of
the main thread ending. The server's coroutines never touch it: they put
commands (add a request, abort one) on a thread-safe queue, and the thread hands each step's
``RequestOutput`` back to the request's ``asyncio.Queue`` through ``call_soon_threadsafe``. When no
request is running the thread sleeps on the command queue.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from dataclasses import dataclass

from pico_vllm.config import EngineConfig
from pico_vllm.engine.llm_engine import LLMEngine, Prompt
from pico_vllm.loader import LoadedModel, load
from pico_vllm.outputs import RequestOutput
from pico_vllm.sampling_params import SamplingParams


@dataclass
class _Add:
    request_id: str
    prompt: Prompt
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue


@dataclass
class _Abort:
    request_id: str


class _AbortAll:
    """Abort every request and hand each its final output (finish_reason "abort")."""


class AsyncEngine:
    """An ``LLMEngine`` on its own thread; ``generate`` streams a request's outputs."""

    def __init__(self, config: EngineConfig, name: str) -> None:
        loaded = load(config.model, config.dtype)
        self.name = name
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._stopping = False
        self._live = 0  # RequestStreams not yet ended; only the event loop touches it
        self.engine: LLMEngine | None = None
        self._thread = threading.Thread(target=self._run, args=(config, loaded), name=f"engine-{name}",
                                        daemon=False)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.config.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    @property
    def num_requests(self) -> int:
        """Requests submitted and not yet finished or closed (admission control reads it).
        Counted on the asyncio side at submission: requests that arrive while the engine thread
        is inside a step all count at once, before it has seen any of them."""
        return self._live

    def generate(self, prompt: Prompt, params: SamplingParams) -> RequestStream:
        """Submit a request now (it counts in ``num_requests`` from this call on) and return
        its outputs as an async iterator; iterating raises ``ValueError`` if the engine rejects
        the request. ``close()`` before the end (a client that disconnected) aborts it."""
        request_id = f"{self.name}-{next(self._ids)}"
        outputs: asyncio.Queue = asyncio.Queue()
        self._commands.put(_Add(request_id, prompt, params, asyncio.get_running_loop(), outputs))
        self._live += 1
        return RequestStream(self, request_id, outputs)

    def abort_all(self) -> None:
        """End every request now: each gets a final output with finish_reason "abort" (the
        server does this when a shutdown's drain time is up)."""
        self._commands.put(_AbortAll())

    def shutdown(self) -> None:
        self._stopping = True
        self._commands.put(None)
        self._thread.join(timeout=10)

    def _run(self, config: EngineConfig, loaded: LoadedModel) -> None:
        try:
            self.engine = LLMEngine(config, loaded)
        except BaseException as e:  # the caller re-raises it
            self._startup_error = e
            self._ready.set()
            return
        self._ready.set()
        while not self._stopping and threading.main_thread().is_alive():
            self._drain(block=not self.engine.has_unfinished_requests())
            if not self.engine.has_unfinished_requests():
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # an engine error fails the running requests, not the server
                for request_id in list(self._queues):
                    self.engine.abort_request(request_id)
                    self._send(request_id, RuntimeError(f"engine error: {e}"))
                continue
            for out in outputs:
                self._send(out.request_id, out)

    def _drain(self, block: bool) -> None:
        while True:
            try:
                command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
            except queue.Empty:
                return
            block = False
            if command is None:
                return
            if isinstance(command, _Add):
                self._queues[command.request_id] = (command.loop, command.outputs)
                try:
                    self.engine.add_request(command.prompt, command.params, command.request_id)
                except (ValueError, TypeError) as e:
                    self._send(command.request_id, e)
            elif isinstance(command, _AbortAll):
                for request_id in list(self._queues):
                    final = self.engine.abort_request(request_id)
                    if final is not None:
                        self._send(request_id, final)
            elif command.request_id in self._queues:
                self.engine.abort_request(command.request_id)
                del self._queues[command.request_id]

    def _send(self, request_id: str, item: RequestOutput | BaseException) -> None:
        target = self._queues.get(request_id)
        if target is None:
            return
        if isinstance(item, BaseException) or item.finished:
            del self._queues[request_id]
        loop, outputs = target
        try:
            loop.call_soon_threadsafe(outputs.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody will read this request
            self._queues.pop(request_id, None)
            self.engine.abort_request(request_id)


class RequestStream:
    """One request's outputs, in order, as ``async for`` yields them. It ends after the
    finished output, or by ``close()``, which aborts the request if it had not finished (safe
    to call twice, and before iterating)."""

    def __init__(self, engine: AsyncEngine, request_id: str, outputs: asyncio.Queue) -> None:
        self.engine, self.request_id, self._outputs = engine, request_id, outputs
        self._ended = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._ended:
            raise StopAsyncIteration
        item = await self._outputs.get()
        if isinstance(item, BaseException):  # rejected, or an engine error: nothing to abort
            self._end()
            raise item
        if item.finished:
            self._end()
        return item

    def close(self) -> None:
        """Abort the request unless it has ended. Not a coroutine, so that it also runs in a
        ``finally`` of a cancelled task (anyio cancels every later ``await`` there)."""
        if not self._ended:
            self._end()
            self.engine._commands.put(_Abort(self.request_id))

    def _end(self) -> None:
        self._ended = True
        self.engine._live -= 1
