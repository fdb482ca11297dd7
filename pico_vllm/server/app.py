"""The OpenAI-compatible HTTP API (FastAPI): completions, chat completions, models, health.

Each model has its own :class:`AsyncEngine` (thread, KV pool); a request is routed by its
``model`` field. Streams are server-sent events ending in ``data: [DONE]``; a client that goes
away aborts its request at once (its blocks are freed). Errors come back in OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``: 400 for invalid input (never FastAPI's 422),
401 for a missing or wrong API key, 404 for an unknown model, 429 when the queue is full or a
key is over its rate, 503 while the server shuts down.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field

from pico_vllm.outputs import RequestOutput
from pico_vllm.sampling_params import SamplingParams
from pico_vllm.server.async_engine import AsyncEngine


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.param, self.headers = param, headers


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What both endpoints take to build ``SamplingParams``."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    def top_n_logprobs(self) -> int | None:
        """How many top logprobs per token the request wants (None: no logprobs)."""
        return None

    def sampling_params(self, max_tokens: int | None) -> SamplingParams:
        return SamplingParams(
            logprobs=self.top_n_logprobs(),
            max_tokens=max_tokens if max_tokens is not None else 16, temperature=self.temperature,
            top_p=self.top_p, top_k=max(self.top_k, 0), min_p=self.min_p,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, seed=self.seed, stop=self.stop,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
        )


class CompletionRequest(SamplingFields):
    prompt: str | list[int]
    echo: bool = False
    logprobs: int | None = None

    def top_n_logprobs(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: str
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def top_n_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(BaseModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


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


class Metrics:
    """Prometheus counters and gauges, in a registry of this app's own."""

    def __init__(self, engines: list[AsyncEngine]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("pico_vllm_requests", "finished requests", ["model", "finish_reason"],
                                registry=self.registry)
        self.prompt_tokens = Counter("pico_vllm_prompt_tokens", "prompt tokens", ["model"],
                                     registry=self.registry)
        self.generated_tokens = Counter("pico_vllm_generation_tokens", "generated tokens", ["model"],
                                        registry=self.registry)
        self.rejected = Counter("pico_vllm_rejected_requests", "requests answered 429", ["reason"],
                                registry=self.registry)
        self.ttft = Histogram("pico_vllm_time_to_first_token_seconds", "arrival to first token",
                              ["model"], registry=self.registry, buckets=LATENCY_BUCKETS)
        self.e2e = Histogram("pico_vllm_e2e_request_latency_seconds", "arrival to last token",
                             ["model"], registry=self.registry, buckets=LATENCY_BUCKETS)
        # Engine state, read from the engine thread's objects when scraped (ints: no lock needed).
        gauges = {
            "pico_vllm_requests_in_flight": ("requests queued or running", lambda e: e.num_requests),
            "pico_vllm_requests_running": ("sequences running", lambda e: len(e.engine.scheduler.running)),
            "pico_vllm_requests_waiting": ("sequences waiting", lambda e: e.engine.scheduler.num_waiting),
            "pico_vllm_kv_blocks_total": ("KV blocks in the pool",
                                          lambda e: e.engine.scheduler.block_manager.num_blocks),
            "pico_vllm_kv_blocks_used": ("KV blocks held by sequences", lambda e: _blocks_used(e)),
            "pico_vllm_prefix_cache_hit_tokens": ("prompt tokens served by the prefix cache",
                                                  lambda e: e.engine.stats.cached_prompt_tokens),
            "pico_vllm_preemptions": ("sequences preempted", lambda e: e.engine.stats.preemptions),
        }
        for name, (doc, read) in gauges.items():
            gauge = Gauge(name, doc, ["model"], registry=self.registry)
            for engine in engines:
                gauge.labels(engine.name).set_function(lambda e=engine, read=read: read(e))

    def recorder(self, started: float, first_token_at: float) -> Callable[[str, RequestOutput], None]:
        """What a request calls with each choice's final output (times from ``time.monotonic``;
        the first token is when every choice had produced one)."""
        def record(model: str, out: RequestOutput) -> None:
            self.ttft.labels(model).observe(first_token_at - started)
            self.e2e.labels(model).observe(time.monotonic() - started)
            self.requests.labels(model, out.finish_reason).inc()
            self.prompt_tokens.labels(model).inc(len(out.prompt_token_ids))
            self.generated_tokens.labels(model).inc(len(out.token_ids))

        return record


LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def _blocks_used(engine: AsyncEngine) -> int:
    manager = engine.engine.scheduler.block_manager
    return manager.num_blocks - manager.num_free_blocks  # cached-but-unused blocks count as free


OPEN_PATHS = ("/health", "/metrics")  # answered without an API key, even while shutting down


def create_app(
    engines: list[AsyncEngine], api_key: str | None = None, max_queue: int = 256,
    rate_limit: float | None = None,
) -> FastAPI:
    """The app serving ``engines`` (the first is the default model)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        app.state.closing = True  # uvicorn is draining: new requests get 503

    app = FastAPI(title="pico-vllm", lifespan=lifespan)
    app.state.closing = False
    by_name = {engine.name: engine for engine in engines}
    metrics = Metrics(engines)
    buckets: dict[str, TokenBucket] = {}

    def error_response(e: APIError) -> JSONResponse:
        body = {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.status}}
        return JSONResponse(body, status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def on_api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        message = f"{where}: {first['msg']}" if where else f"request body: {first['msg']}"
        return error_response(APIError(400, message, param=where or None))

    @app.middleware("http")
    async def gate(request: Request, call_next):
        """Shutdown (503), API key (401) and per-key rate limit (429), before any handler."""
        if request.url.path in OPEN_PATHS:
            return await call_next(request)
        if app.state.closing:
            return error_response(APIError(503, "server is shutting down", "server_error"))
        key = request.headers.get("authorization", "")
        if api_key and key != f"Bearer {api_key}":
            return error_response(APIError(401, "missing or wrong API key", "authentication_error"))
        if rate_limit and request.method == "POST":
            bucket = buckets.setdefault(key or (request.client.host if request.client else ""),
                                        TokenBucket(rate_limit))
            wait = bucket.take()
            if wait:
                metrics.rejected.labels("rate_limit").inc()
                return error_response(APIError(
                    429, f"rate limit of {rate_limit:g} requests/s exceeded", "rate_limit_error",
                    headers={"Retry-After": str(math.ceil(wait))}))
        return await call_next(request)

    def engine_for(model: str | None) -> AsyncEngine:
        if model is None:
            return engines[0]
        if model not in by_name:
            raise APIError(404, f"model {model!r} is not served here; models: {', '.join(by_name)}",
                           "not_found_error", "model")
        return by_name[model]

    def admit(engine: AsyncEngine) -> None:
        if engine.num_requests >= max_queue:
            metrics.rejected.labels("queue_full").inc()
            raise APIError(429, f"server is at capacity ({max_queue} requests); retry shortly",
                           "rate_limit_error", headers={"Retry-After": "1"})

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        engine = engine_for(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        if body.prompt is not None:
            tokens = list(engine.tokenizer.encode(body.prompt))
        else:
            tokens = _chat_prompt(engine, body.messages)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        engine = engine_for(body.model)
        bad = [t for t in body.tokens if not 0 <= t < engine.vocab_size]
        if bad:
            raise APIError(400, f"tokens {bad[:5]} are outside the vocabulary [0, {engine.vocab_size})",
                           param="tokens")
        return {"prompt": engine.tokenizer.decode(body.tokens)}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "pico-vllm"} for name in by_name
        ]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        engine = engine_for(body.model)
        admit(engine)
        params = _params(body, body.max_tokens)
        prefix = ""
        if body.echo:
            prompt = body.prompt
            prefix = prompt if isinstance(prompt, str) else engine.tokenizer.decode(prompt)
        started = time.monotonic()
        streams = await _start(engine, body.prompt, params, body.n)
        record = metrics.recorder(started, first_token_at=time.monotonic())
        return await _respond(body, engine.name, "text_completion", streams,
                              lambda out, delta: {"text": delta},
                              lambda out: {"text": prefix + out.text}, record,
                              _logprob_format(engine, chat=False) if params.logprobs is not None else None)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        engine = engine_for(body.model)
        admit(engine)
        params = _params(body, body.max_completion_tokens or body.max_tokens)
        prompt = _chat_prompt(engine, body.messages)
        started = time.monotonic()
        streams = await _start(engine, prompt, params, body.n)
        record = metrics.recorder(started, first_token_at=time.monotonic())
        return await _respond(body, engine.name, "chat.completion", streams,
                              lambda out, delta: {"delta": {"content": delta}},
                              lambda out: {"message": {"role": "assistant", "content": out.text}},
                              record,
                              _logprob_format(engine, chat=True) if params.logprobs is not None else None)

    return app


def _chat_prompt(engine: AsyncEngine, messages: list[ChatMessage]) -> list[int]:
    """Token ids of ``messages`` through the model's chat template, ready for the reply."""
    tokenizer = engine.tokenizer
    if getattr(tokenizer, "chat_template", None) is None:
        raise APIError(400, f"model {engine.name!r} has no chat template", param="messages")
    turns = [{"role": m.role, "content": m.text()} for m in messages]
    return list(tokenizer.apply_chat_template(turns, add_generation_prompt=True))


MAX_N = 16  # choices per request


def _params(body: SamplingFields, max_tokens: int | None) -> SamplingParams:
    if not 1 <= body.n <= MAX_N:
        raise APIError(400, f"n must be in [1, {MAX_N}], got {body.n}", param="n")
    try:
        return body.sampling_params(max_tokens)
    except ValueError as e:
        raise APIError(400, str(e), param=str(e).split(" ", 1)[0]) from None


Stream = tuple[RequestOutput, AsyncIterator[RequestOutput]]  # first output, the rest


async def _start(engine: AsyncEngine, prompt, params: SamplingParams, n: int) -> list[Stream]:
    """Submit the ``n`` choices of a request (choice i seeded ``seed + i``) and wait for each
    one's first output: a request the engine rejects fails here, before any byte is sent."""
    streams: list[Stream] = []
    try:
        for i in range(n):
            seed = None if params.seed is None else params.seed + i
            rest = engine.generate(prompt, replace(params, seed=seed))
            streams.append((await anext(rest), rest))
    except ValueError as e:
        for _, rest in streams:
            await rest.aclose()
        raise APIError(400, str(e), param="prompt") from None
    return streams


LogprobFormat = Callable[[RequestOutput, int], dict]


def _logprob_format(engine: AsyncEngine, chat: bool) -> LogprobFormat:
    """``format(out, n)``: OpenAI's logprobs object for the last ``n`` tokens of ``out`` (chat:
    ``{"content": [...]}``; completions: the legacy parallel lists)."""
    def text(token_id: int) -> str:
        return engine.tokenizer.decode([token_id])

    def format_(out: RequestOutput, n: int) -> dict:
        start = len(out.token_ids) - n
        ids, lps, tops = out.token_ids[start:], out.logprobs[start:], out.top_logprobs[start:]
        if chat:
            def entry(t: int, lp: float) -> dict:
                return {"token": text(t), "logprob": lp, "bytes": list(text(t).encode())}

            return {"content": [entry(t, lp) | {"top_logprobs": [entry(i, v) for i, v in top]}
                                for t, lp, top in zip(ids, lps, tops)]}
        return {"tokens": [text(t) for t in ids], "token_logprobs": lps,
                "top_logprobs": [{text(i): v for i, v in top} for top in tops]}

    return format_


def _usage(outs: list[RequestOutput]) -> dict:
    prompt, completion = len(outs[0].prompt_token_ids), sum(len(o.token_ids) for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _respond(body: SamplingFields, model: str, kind: str, streams: list[Stream], delta_choice,
                   final_choice, record: Callable[[str, RequestOutput], None],
                   logprobs: LogprobFormat | None = None):
    """A JSON body with every choice's final output, or an SSE stream of the choices' deltas as
    they come; ``record`` sees the final output of each choice that finished."""
    request_id = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if not body.stream:
        async def last(first: RequestOutput, rest: AsyncIterator[RequestOutput]) -> RequestOutput:
            out = first
            async for out in rest:  # noqa: B007 (the last output is the final one)
                pass
            return out

        outs = await asyncio.gather(*(last(first, rest) for first, rest in streams))
        choices = []
        for index, out in enumerate(outs):
            record(model, out)
            choices.append(final_choice(out) | {
                "index": index, "finish_reason": out.finish_reason,
                "logprobs": logprobs(out, len(out.token_ids)) if logprobs else None})
        return {"id": request_id, "object": kind, "created": created, "model": model,
                "choices": choices, "usage": _usage(outs)}

    chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else kind

    def event(choices: list, usage: dict | None = None) -> str:
        payload = {"id": request_id, "object": chunk_kind, "created": created, "model": model,
                   "choices": choices}
        if usage is not None:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"

    async def events() -> AsyncIterator[str]:
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, first: RequestOutput, rest: AsyncIterator[RequestOutput]) -> None:
            try:
                await merged.put((index, first))
                async for out in rest:
                    await merged.put((index, out))
            except Exception as e:  # handed to the consumer, which ends the stream with it
                await merged.put((index, e))

        pumps = [asyncio.create_task(pump(i, first, rest)) for i, (first, rest) in enumerate(streams)]
        finals: dict[int, RequestOutput] = {}
        try:
            if kind == "chat.completion":
                yield event([{"delta": {"role": "assistant", "content": ""}, "index": i,
                              "finish_reason": None} for i in range(len(streams))])
            while len(finals) < len(streams):
                index, out = await merged.get()
                if isinstance(out, Exception):
                    raise out
                choice = delta_choice(out, out.delta_text) | {"index": index,
                                                               "finish_reason": out.finish_reason}
                if logprobs:
                    choice["logprobs"] = logprobs(out, len(out.delta_token_ids))
                yield event([choice])
                if out.finished:
                    finals[index] = out
                    record(model, out)
            if body.stream_options and body.stream_options.include_usage:
                yield event([], _usage([finals[i] for i in range(len(streams))]))
        except Exception as e:  # an engine error mid-stream: an error chunk, then the end
            error = {"message": str(e), "type": "server_error", "param": None, "code": 500}
            yield f"data: {json.dumps({'error': error})}\n\n"
        finally:  # a client that went away: abort what is still running, now
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for _, rest in streams:
                await rest.aclose()
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
