"""One engine thread per model, and the asyncio side that talks to it.

MLX streams belong to the thread that made them, so the ``LLMEngine`` is created on its own
thread, which loads the weights too (a pipeline stage's are read lazily, on the stream that
evaluates them), and every step runs there; the caller waits for it, so a bad ``--model`` fails
where the server starts. The thread is not a daemon: a daemon thread that
had run the model made the process abort at exit ("terminate called without an active
exception", MLX 0.32 on Linux). It stops on ``shutdown()``, or by itself within half a second of
the main thread ending. The server's coroutines never touch it: they put
commands (add a request, abort one) on a thread-safe queue, and the thread hands each step's
``RequestOutput`` back to the request's ``asyncio.Queue`` through ``call_soon_threadsafe``. When no
request is running the thread sleeps on the command queue.

Under tensor parallelism (``mlx.launch``) this runs on rank 0 only: each loop turns the commands
into plain tuples and shares them (``distributed.share``) before applying them, and every other
rank runs :func:`follow`, applying the same tuples to its own engine and stepping in lockstep.
Before each share rank 0 rings a ``distributed.Doorbell``: an idle follower sleeps on it rather
than inside MLX's collective, which busy-polls.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections import Counter
from dataclasses import dataclass

import mlx.core as mx

from pico_vllm import distributed
from pico_vllm.config import EngineConfig
from pico_vllm.engine.llm_engine import LLMEngine, Prompt, StepError
from pico_vllm.loader import LoadedModel, load
from pico_vllm.outputs import RequestOutput
from pico_vllm.sampling_params import SamplingParams
from pico_vllm.tool_calls import parser_for


@dataclass
class _Add:
    request_id: str
    prompt: Prompt
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue


class EngineError(RuntimeError):
    """A request failed inside the engine (its step raised), or the engine thread has stopped
    (``stopped``): the server answers 500 or 503, in OpenAI's shape."""

    def __init__(self, message: str, stopped: bool = False) -> None:
        super().__init__(message)
        self.stopped = stopped


@dataclass
class _Abort:
    request_id: str


class _AbortAll:
    """Abort every request and hand each its final output (finish_reason "abort")."""


class AsyncEngine:
    """An ``LLMEngine`` on its own thread; ``generate`` streams a request's outputs."""

    def __init__(self, config: EngineConfig, name: str, tool_call_parser: str | None = None,
                 reasoning_parser: str | None = None) -> None:
        self.name = name
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self.failure: BaseException | None = None  # why the engine thread died, if it did
        self._stopping = False
        # RequestStreams not yet ended, per owner (API key or client address); only the event
        # loop touches it.
        self._live_by_owner: Counter[str] = Counter()
        self.engine: LLMEngine | None = None
        self._loaded: LoadedModel | None = None  # what the engine thread loaded
        self._thread = threading.Thread(target=self._run, args=(config,), name=f"engine-{name}",
                                        daemon=False)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error
        loaded = self._loaded
        # How this model writes tool calls and whether it thinks aloud (server/chat.py).
        template = getattr(loaded.tokenizer, "chat_template", None)
        self.tool_parser = parser_for(loaded.config.get("model_type", ""), template, tool_call_parser)
        self.reasoning = reasoning_parser is not None
        self.special_tokens = set(getattr(loaded.tokenizer, "all_special_tokens", []))

    def failure_message(self) -> str | None:
        """Why this engine stopped serving (its thread died), or None while it serves."""
        if self.failure is None:
            return None
        return f"the engine of model {self.name!r} has stopped: {type(self.failure).__name__}: {self.failure}"

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.config.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    async def check_structured_outputs(self, params: SamplingParams) -> None:
        """Compile the request's output constraint off the event loop (a large schema can take
        a while); ValueError if it is invalid."""
        await asyncio.to_thread(self.engine.check_structured_outputs, params)

    @property
    def num_requests(self) -> int:
        """Requests submitted and not yet finished or closed (admission control reads it).
        Counted on the asyncio side at submission: requests that arrive while the engine thread
        is inside a step all count at once, before it has seen any of them."""
        return sum(self._live_by_owner.values())

    def generate(self, prompt: Prompt, params: SamplingParams, owner: str = "") -> RequestStream:
        """Submit a request now (it counts in ``num_requests``, and in ``requests_of(owner)``,
        from this call on) and return its outputs as an async iterator; iterating raises
        ``ValueError`` if the engine rejects the request. ``close()`` before the end (a client
        that disconnected) aborts it."""
        if self.failure is not None:
            raise EngineError(self.failure_message(), stopped=True)
        request_id = f"{self.name}-{next(self._ids)}"
        outputs: asyncio.Queue = asyncio.Queue()
        self._commands.put(_Add(request_id, prompt, params, asyncio.get_running_loop(), outputs))
        self._live_by_owner[owner] += 1
        return RequestStream(self, request_id, outputs, owner)

    def requests_of(self, owner: str) -> int:
        """Requests of ``owner`` (an API key or a client address) not yet finished or closed."""
        return self._live_by_owner.get(owner, 0)

    def stream_ended(self, owner: str) -> None:
        """A ``RequestStream`` of ``owner`` ended: it no longer counts."""
        self._live_by_owner[owner] -= 1
        if not self._live_by_owner[owner]:
            del self._live_by_owner[owner]

    def abort_all(self) -> None:
        """End every request now: each gets a final output with finish_reason "abort" (the
        server does this when a shutdown's drain time is up)."""
        self._commands.put(_AbortAll())

    def shutdown(self) -> None:
        self._stopping = True
        self._commands.put(None)
        self._thread.join(timeout=10)

    def _run(self, config: EngineConfig) -> None:
        try:
            self._loaded = load(config.model, config.dtype, config.model_impl,
                                lazy=config.pipeline_parallel_size > 1)
            self.engine = LLMEngine(config, self._loaded)
            doorbell = distributed.Doorbell(self.engine.group) if self.engine.group is not None else None
        except BaseException as e:  # the caller re-raises it
            self._startup_error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            self._serve(doorbell)
        except BaseException as e:  # the thread is dying: say so to everyone waiting, and after
            self.failure = e
            for request_id in list(self._queues):
                self._send(request_id, EngineError(self.failure_message(), stopped=True))
            raise

    def _serve(self, doorbell: distributed.Doorbell | None) -> None:
        """The engine thread's loop: take the server's commands, step, hand the outputs back.
        Going idle gives MLX's buffer cache back (``mx.clear_cache``): an idle server holds only
        its weights and pool, and the next burst re-grows the cache in its first steps."""
        busy = False
        while True:
            if busy and not self.engine.has_unfinished_requests():
                mx.clear_cache()
            busy = self.engine.has_unfinished_requests()
            wire = self._take_commands(block=not busy)
            stop = self._stopping or not threading.main_thread().is_alive()
            if doorbell is not None:  # tensor parallel: the other ranks apply the same
                doorbell.ring()
                distributed.share((wire, stop), self.engine.group)
            if stop:
                return
            for command in wire:
                result = apply_command(self.engine, command)
                if command[0] == "abort":
                    self._queues.pop(command[1], None)
                elif result is not None:  # a rejection, or the final output of an "end"
                    self._send(command[1], result)
            if not self.engine.has_unfinished_requests():
                continue
            try:
                outputs = self.engine.step()
            except StepError as e:  # fails the requests of that step (aborted), not the others
                for request_id in e.request_ids:
                    self._send(request_id, EngineError(f"engine error: {e}"))
                continue
            for out in outputs:
                self._send(out.request_id, out)

    def _take_commands(self, block: bool) -> list[tuple]:
        """The server's requests since the last step, as plain tuples (what the other
        tensor-parallel ranks receive): ``("add", id, prompt, params)``, ``("abort", id)`` for a
        client that left, ``("end", id)`` for a request a shutdown cuts short. Waits up to 0.5 s
        for the first when ``block``."""
        wire = []
        while True:
            try:
                command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
            except queue.Empty:
                return wire
            block = False
            if isinstance(command, _Add):
                self._queues[command.request_id] = (command.loop, command.outputs)
                wire.append(("add", command.request_id, command.prompt, command.params))
            elif isinstance(command, _Abort):
                wire.append(("abort", command.request_id))
            elif isinstance(command, _AbortAll):
                wire += [("end", request_id) for request_id in self._queues]
            # None only wakes the loop (shutdown)

    def _send(self, request_id: str, item: RequestOutput | BaseException) -> None:
        if isinstance(item, RequestOutput) and item.finish_reason == "error":
            item = EngineError(f"engine error: {item.error}")
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
            self._commands.put(_Abort(request_id))  # next loop, on every tensor-parallel rank


class RequestStream:
    """One request's outputs, in order, as ``async for`` yields them. It ends after the
    finished output, or by ``close()``, which aborts the request if it had not finished (safe
    to call twice, and before iterating)."""

    def __init__(self, engine: AsyncEngine, request_id: str, outputs: asyncio.Queue, owner: str = "") -> None:
        self.engine, self.request_id, self._outputs, self.owner = engine, request_id, outputs, owner
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
        self.engine.stream_ended(self.owner)


def apply_command(engine: LLMEngine, command: tuple) -> BaseException | RequestOutput | None:
    """Apply one command of ``AsyncEngine._take_commands`` to ``engine``: an "add" returns its
    rejection (or None), an "abort"/"end" the request's final output (or None)."""
    kind, request_id = command[0], command[1]
    if kind == "add":
        try:
            engine.add_request(command[2], command[3], request_id)
        except (ValueError, TypeError) as e:
            return e
        return None
    return engine.abort_request(request_id)


def follow(config: EngineConfig) -> None:
    """A tensor-parallel rank other than 0 under ``pico-vllm serve``: no HTTP. Each loop it
    receives rank 0's commands, applies them to its own engine and steps it (the all_sums inside
    the model meet rank 0's), discarding the outputs, until rank 0 stops."""
    engine = LLMEngine(config)
    doorbell = distributed.Doorbell(engine.group)  # idle, wait here: not inside a spinning collective
    while True:
        doorbell.wait()
        wire, stop = distributed.share(None, engine.group)
        if stop:
            return
        for command in wire:
            apply_command(engine, command)
        if engine.has_unfinished_requests():
            try:
                engine.step()
            except Exception:  # rank 0 hit the same error and aborts its requests: so do we
                for request_id in engine.unfinished_request_ids():
                    engine.abort_request(request_id)
