"""The routes: each one reads its body, picks its engine, checks its parameters, admits the
request, starts its choices and answers (``responses.respond``, or ``anthropic.answer``).

``health`` and ``metrics`` are open; every other route sits behind ``state.check_client``.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pico_vllm.outputs import RequestOutput
from pico_vllm.sampling_params import SamplingParams
from pico_vllm.server import anthropic
from pico_vllm.server.async_engine import AsyncEngine
from pico_vllm.server.chat import Turn, render, tool_constraint
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
from pico_vllm.server.responses import ChatReplies, CompletionReplies, logprob_format, respond, start_choices
from pico_vllm.server.state import ServerState, check_client, server_state
from pico_vllm.tool_calls import Tool, ToolCall

open_routes = APIRouter()
guarded_routes = APIRouter(dependencies=[Depends(check_client)])
State = Depends(server_state)


@open_routes.get("/health")
async def health(server: ServerState = State) -> dict:
    """200 while every engine serves; 503 (naming why) once one has stopped: a supervisor's cue
    to restart the server, which exits 1 by itself."""
    server.check_engines_run()
    return {"status": "ok"}


@open_routes.get("/metrics")
async def metrics(server: ServerState = State) -> Response:
    return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@guarded_routes.post("/tokenize")
async def tokenize(body: TokenizeRequest, server: ServerState = State) -> dict:
    engine = server.engine_for(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of prompt and messages", param="prompt")
    if body.prompt is not None:
        tokens = list(engine.tokenizer.encode(body.prompt))
    else:
        tokens = _chat_prompt(engine, body.messages)
    return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_model_len}


@guarded_routes.post("/detokenize")
async def detokenize(body: DetokenizeRequest, server: ServerState = State) -> dict:
    engine = server.engine_for(body.model)
    bad = [t for t in body.tokens if not 0 <= t < engine.vocab_size]
    if bad:
        raise APIError(400, f"tokens {bad[:5]} are outside the vocabulary [0, {engine.vocab_size})",
                       param="tokens")
    return {"prompt": engine.tokenizer.decode(body.tokens)}


@guarded_routes.get("/v1/models")
async def models(server: ServerState = State) -> dict:
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": 0, "owned_by": "pico-vllm"} for name in server.by_name
    ]}


@guarded_routes.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, server: ServerState = State):
    engine = server.engine_for(body.model)
    prompts = body.prompts()
    params = await _checked_params(engine, body, body.max_tokens)
    server.admit(engine, body.n * len(prompts), request)

    def echoed(out: RequestOutput) -> str:
        if not body.echo:
            return ""
        return out.prompt if out.prompt is not None else engine.tokenizer.decode(out.prompt_token_ids)

    record = server.metrics.request(engine.name, time.monotonic())
    streams = await start_choices(request, engine, prompts, params, body.n, record)
    logprobs = logprob_format(engine, chat=False) if params.logprobs is not None else None
    return await respond(request, body, engine.name, streams, CompletionReplies(echoed, logprobs), record)


@guarded_routes.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request, server: ServerState = State):
    engine = server.engine_for(body.model)
    max_tokens = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
    tools = [Tool(t.function.name, t.function.description, t.function.parameters) for t in body.tools or []]
    choice = body.tool_choice_name()
    parser = engine.tool_parser if tools and choice != "none" else None
    params = await _checked_params(engine, body, max_tokens, tools if parser else [], choice,
                                   body.parallel_tool_calls)
    prompt = _chat_prompt(engine, body.messages, tools if parser else [])
    server.admit(engine, body.n, request)
    record = server.metrics.request(engine.name, time.monotonic())
    streams = await start_choices(request, engine, [prompt], params, body.n, record)
    reply = ChatReplies(parser, engine.reasoning,
                        logprob_format(engine, chat=True) if params.logprobs is not None else None)
    return await respond(request, body, engine.name, streams, reply, record)


@guarded_routes.post("/v1/messages")
async def messages(body: anthropic.MessagesRequest, request: Request, server: ServerState = State):
    engine = server.engine_for(body.model)
    prompt, params, reader = await anthropic.prepare(engine, body)
    server.admit(engine, 1, request)
    record = server.metrics.request(engine.name, time.monotonic())
    ((first, rest),) = await start_choices(request, engine, [prompt], params, 1, record)
    return await anthropic.answer(request, body.stream, engine.name, first, rest, reader, record)


@guarded_routes.post("/v1/messages/count_tokens")
async def count_tokens(body: anthropic.CountTokensRequest, server: ServerState = State) -> dict:
    engine = server.engine_for(body.model)
    return {"input_tokens": len(anthropic.prompt_ids(engine, body, body.tool_list()))}


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
