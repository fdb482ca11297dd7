"""The OpenAI-compatible HTTP API (FastAPI): completions, chat completions, models, health.

Each model has its own :class:`AsyncEngine` (thread, KV pool); a request is routed by its
``model`` field. Streams are server-sent events ending in ``data: [DONE]``; a client that goes
away aborts its request at once (its blocks are freed). Errors come back in OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``: 400 for invalid input (never FastAPI's 422),
401 for a missing or wrong API key, 404 for an unknown model or route, 405 for a wrong method,
429 when the queue is full or a key is over its rate, 503 while the server shuts down.
"""

from __future__ import annotations

import hmac
import json
import math
import time
from contextlib import asynccontextmanager
from dataclasses import replace

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from pico_vllm.outputs import RequestOutput
from pico_vllm.sampling_params import SamplingParams
from pico_vllm.server import anthropic
from pico_vllm.server.anthropic import ERROR_TYPES
from pico_vllm.server.async_engine import AsyncEngine, EngineError
from pico_vllm.server.chat import Turn, render, tool_constraint
from pico_vllm.server.metrics import Metrics
from pico_vllm.server.protocol import (
    MAX_N,
    APIError,
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
)
from pico_vllm.server.responses import (
    ChatReplies,
    ClientGone,
    CompletionReplies,
    logprob_format,
    respond,
    start_choices,
)
from pico_vllm.tool_calls import Tool, ToolCall


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


MAX_REQUEST_BYTES = 8 * 1024 * 1024  # a request body's default limit (--max-request-bytes)


def error_response(e: APIError, path: str) -> JSONResponse:
    """OpenAI's error shape, or Anthropic's on the Messages API's routes."""
    if path.startswith("/v1/messages"):
        kind = ERROR_TYPES.get(e.status, "api_error") if e.kind != "overloaded_error" else e.kind
        body = {"type": "error", "error": {"type": kind, "message": e.message}}
    else:
        body = {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.status}}
    return JSONResponse(body, status_code=e.status, headers=e.headers)


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


def create_app(
    engines: list[AsyncEngine], api_key: str | None = None, max_queue: int = 256,
    rate_limit: float | None = None, max_request_bytes: int = MAX_REQUEST_BYTES,
    allowed_origins: list[str] | None = None, max_per_client: int | None = None,
) -> FastAPI:
    """The app serving ``engines`` (the first is the default model). Browsers on other origins
    may call it only from ``allowed_origins`` (CORS; none by default); one API key (or, without
    keys, one client address) has at most ``max_per_client`` requests in flight."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        app.state.closing = True  # uvicorn is draining: new requests get 503

    app = FastAPI(title="pico-vllm", lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=max_request_bytes)
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type", "x-api-key"])
    app.state.closing = False
    by_name = {engine.name: engine for engine in engines}
    metrics = Metrics(engines)
    buckets: dict[str, TokenBucket] = {}

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e, request.url.path)

    @app.exception_handler(EngineError)
    async def on_engine_error(request: Request, e: EngineError) -> JSONResponse:
        return error_response(APIError(503 if e.stopped else 500, str(e), "server_error"), request.url.path)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, e: Exception) -> JSONResponse:
        """Never a bare "Internal Server Error": a bug answers in OpenAI's shape too."""
        return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error"),
                              request.url.path)

    @app.exception_handler(ClientGone)
    async def on_client_gone(_: Request, e: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        if first["type"] == "json_invalid":  # its "loc" is a character offset, not a field
            reason = first.get("ctx", {}).get("error", first["msg"])
            return error_response(APIError(400, f"request body is not valid JSON: {reason}"),
                                  request.url.path)
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        reason = "not supported by this server" if first["type"] == "extra_forbidden" else first["msg"]
        message = f"{where}: {reason}" if where else f"request body: {reason}"
        return error_response(APIError(400, message, param=where or None), request.url.path)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, e: HTTPException) -> JSONResponse:
        """Starlette's own errors (an unknown route, a wrong method) in OpenAI's shape too."""
        if e.status_code == 404:
            return error_response(APIError(404, f"no route {request.method} {request.url.path}",
                                           "not_found_error"), request.url.path)
        if e.status_code == 405:
            allowed = e.headers.get("Allow", "") if e.headers else ""
            message = f"{request.method} is not allowed on {request.url.path} (allowed: {allowed})"
            return error_response(APIError(405, message, headers=e.headers), request.url.path)
        if e.status_code == 400 and e.__cause__ is not None:  # FastAPI could not parse the body
            message = f"request body is not valid JSON: {type(e.__cause__).__name__}: {e.__cause__}"
            return error_response(APIError(400, message), request.url.path)
        return error_response(APIError(e.status_code, str(e.detail), headers=e.headers), request.url.path)

    async def gate(request: Request) -> None:
        """Shutdown (503), API key (401) and per-key rate limit (429) for every route but
        /health and /metrics. A dependency, not a middleware: Starlette's ``BaseHTTPMiddleware``
        hides a client's disconnect from ``request.is_disconnected()``."""
        if app.state.closing:
            raise APIError(503, "server is shutting down", "server_error")
        refuse_if_an_engine_stopped()
        # OpenAI's clients send `Authorization: Bearer KEY`, Anthropic's `x-api-key: KEY`.
        key = request.headers.get("authorization", "") or f"Bearer {request.headers.get('x-api-key', '')}"
        # In constant time: how long a wrong key takes to refuse says nothing about the right one.
        if api_key and not hmac.compare_digest(key.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or wrong API key", "authentication_error")
        request.state.client = key if api_key else (request.client.host if request.client else "")
        if rate_limit and request.method == "POST":
            bucket = buckets.setdefault(key or (request.client.host if request.client else ""),
                                        TokenBucket(rate_limit))
            wait = bucket.take()
            if wait:
                metrics.rejected.labels("rate_limit").inc()
                raise APIError(429, f"rate limit of {rate_limit:g} requests/s exceeded", "rate_limit_error",
                               headers={"Retry-After": str(math.ceil(wait))})

    guarded = APIRouter(dependencies=[Depends(gate)])

    def engine_for(model: str | None) -> AsyncEngine:
        if model is None:  # fine with one model; with several, which one must be said
            if len(engines) > 1:
                raise APIError(400, f"model is required when several models are served: "
                                    f"{', '.join(by_name)}", param="model")
            return engines[0]
        if model not in by_name:
            raise APIError(404, f"model {model!r} is not served here; models: {', '.join(by_name)}",
                           "not_found_error", "model")
        return by_name[model]

    def admit(engine: AsyncEngine, n: int, request: Request) -> None:
        client = request.state.client
        if max_per_client and sum(e.requests_of(client) for e in engines) + n > max_per_client:
            metrics.rejected.labels("client_limit").inc()
            raise APIError(429, f"this {'API key' if api_key else 'client'} already has requests in flight "
                                f"(at most {max_per_client}: --max-concurrent-per-key)", "rate_limit_error",
                           headers={"Retry-After": "1"})
        if engine.num_requests + n > max_queue:
            metrics.rejected.labels("queue_full").inc()
            raise APIError(429, f"server is at capacity ({max_queue} requests); retry shortly",
                           "rate_limit_error", headers={"Retry-After": "1"})

    def refuse_if_an_engine_stopped() -> None:
        stopped = "; ".join(filter(None, (engine.failure_message() for engine in engines)))
        if stopped:
            raise APIError(503, stopped, "server_error")

    @app.get("/health")
    async def health() -> dict:
        """200 while every engine serves; 503 (naming why) once one has stopped: a supervisor's
        cue to restart the server, which exits 1 by itself."""
        refuse_if_an_engine_stopped()
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @guarded.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        engine = engine_for(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        if body.prompt is not None:
            tokens = list(engine.tokenizer.encode(body.prompt))
        else:
            tokens = _chat_prompt(engine, body.messages)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_model_len}

    @guarded.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        engine = engine_for(body.model)
        bad = [t for t in body.tokens if not 0 <= t < engine.vocab_size]
        if bad:
            raise APIError(400, f"tokens {bad[:5]} are outside the vocabulary [0, {engine.vocab_size})",
                           param="tokens")
        return {"prompt": engine.tokenizer.decode(body.tokens)}

    @guarded.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "pico-vllm"} for name in by_name
        ]}

    @guarded.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        engine = engine_for(body.model)
        prompts = body.prompts()
        params = await _checked_params(engine, body, body.max_tokens)
        # Admission right before submission, with no await between: concurrent requests are
        # counted one by one (an await here let a burst all pass the check).
        admit(engine, body.n * len(prompts), request)

        def echoed(out: RequestOutput) -> str:
            if not body.echo:
                return ""
            return out.prompt if out.prompt is not None else engine.tokenizer.decode(out.prompt_token_ids)

        record = metrics.request(engine.name, time.monotonic())
        streams = await start_choices(request, engine, prompts, params, body.n, record)
        logprobs = logprob_format(engine, chat=False) if params.logprobs is not None else None
        reply = CompletionReplies(echoed, logprobs)
        return await respond(request, body, engine.name, streams, reply, record)

    @guarded.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        engine = engine_for(body.model)
        max_tokens = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
        tools = [Tool(t.function.name, t.function.description, t.function.parameters)
                 for t in body.tools or []]
        choice = body.tool_choice_name()
        parser = engine.tool_parser if tools and choice != "none" else None
        params = await _checked_params(engine, body, max_tokens, tools if parser else [], choice,
                                       body.parallel_tool_calls)
        prompt = _chat_prompt(engine, body.messages, tools if parser else [])
        admit(engine, body.n, request)  # right before submission (see completions)
        record = metrics.request(engine.name, time.monotonic())
        streams = await start_choices(request, engine, [prompt], params, body.n, record)
        reply = ChatReplies(parser, engine.reasoning,
                            logprob_format(engine, chat=True) if params.logprobs is not None else None)
        return await respond(request, body, engine.name, streams, reply, record)

    @guarded.post("/v1/messages")
    async def messages(body: anthropic.MessagesRequest, request: Request):
        engine = engine_for(body.model)
        prompt, params, reader = await anthropic.prepare(engine, body)
        admit(engine, 1, request)  # right before submission (see completions)
        record = metrics.request(engine.name, time.monotonic())
        ((first, rest),) = await start_choices(request, engine, [prompt], params, 1, record)
        return await anthropic.answer(request, body.stream, engine.name, first, rest, reader, record)

    @guarded.post("/v1/messages/count_tokens")
    async def count_tokens(body: anthropic.CountTokensRequest) -> dict:
        engine = engine_for(body.model)
        return {"input_tokens": len(anthropic.prompt_ids(engine, body, body.tool_list()))}

    app.include_router(guarded)
    return app


def _chat_prompt(engine: AsyncEngine, messages: list[ChatMessage], tools: list[Tool] = ()) -> list[int]:
    """Token ids of ``messages`` (and ``tools``) through the model's chat template, ready for the
    reply."""
    roles = {"developer": "system", "function": "tool"}
    turns = [Turn(roles.get(m.role, m.role), m.text(),
                  [ToolCall(c.function.name, c.function.arguments, c.id) for c in m.tool_calls or []],
                  m.tool_call_id) for m in messages]
    for turn in turns:
        for call in turn.tool_calls:
            try:
                json.loads(call.arguments)
            except json.JSONDecodeError:
                raise APIError(400, f"tool call {call.id}: arguments are not JSON",
                               param="messages") from None
    try:
        return render(engine.tokenizer, turns, list(tools), engine.tool_parser)
    except ValueError:  # no chat template
        raise APIError(400, f"model {engine.name!r} has no chat template", param="messages") from None


async def _checked_params(engine: AsyncEngine, body: SamplingFields, max_tokens: int | None,
                          tools: list[Tool] = (), tool_choice: str = "none",
                          parallel_tool_calls: bool = True) -> SamplingParams:
    """The request's ``SamplingParams``, its output constraint compiled (an output format, or the
    tool-call grammar ``tool_choice`` asks for): a bad schema, regex, grammar or tool definition is
    a 400 naming the field the request gave it in."""
    params = _params(body, max_tokens)
    field = body.structured_outputs_params()[1]
    if tools:
        if params.structured_outputs is not None:
            raise APIError(400, f"tools and {field} cannot be combined: give one", param=field)
        try:
            constraint = tool_constraint(list(tools), tool_choice, parallel_tool_calls, engine.tool_parser,
                                         engine.special_tokens)
        except ValueError as e:
            raise APIError(400, str(e), param="tool_choice") from None
        params, field = replace(params, structured_outputs=constraint), "tools"
    try:
        await engine.check_structured_outputs(params)
    except ValueError as e:
        raise APIError(400, f"{field}: {e}", param=field) from None
    return params


def _params(body: SamplingFields, max_tokens: int | None) -> SamplingParams:
    if not 1 <= body.n <= MAX_N:
        raise APIError(400, f"n must be in [1, {MAX_N}], got {body.n}", param="n")
    try:
        return body.sampling_params(max_tokens)
    except ValueError as e:  # SamplingParams names its own field: say the request's name for it
        field, rest = str(e).split(" ", 1)
        param = body.request_field(field)
        raise APIError(400, f"{param} {rest}", param=param) from None
