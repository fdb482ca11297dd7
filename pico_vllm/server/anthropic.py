"""Anthropic's Messages API (``POST /v1/messages``, ``/v1/messages/count_tokens``) over the same
engines, admission, metrics and disconnect handling as the OpenAI routes: what Claude Code and
the ``anthropic`` client speak (``ANTHROPIC_BASE_URL=http://127.0.0.1:8000``).

A request becomes the same pieces as a chat completion (``chat.py``: turns, tools, a tool
choice); the reply is read back the same way and answered in Anthropic's shapes: content blocks
(``text``, ``tool_use``), ``stop_reason`` (``end_turn``, ``max_tokens``, ``stop_sequence``,
``tool_use``), usage with ``cache_read_input_tokens`` (the prefix cache's share of the prompt),
and for ``stream`` the event sequence ``message_start``, ``content_block_start`` /
``content_block_delta`` (``text_delta``, ``input_json_delta``) / ``content_block_stop``,
``message_delta``, ``message_stop``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Literal

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from pico_vllm.outputs import RequestOutput
from pico_vllm.sampling_params import SamplingParams
from pico_vllm.server.async_engine import AsyncEngine, RequestStream
from pico_vllm.server.chat import ReplyReader, Turn, render, tool_constraint
from pico_vllm.server.protocol import APIError
from pico_vllm.server.responses import unless_client_leaves
from pico_vllm.tool_calls import Tool, ToolCall

# Anthropic's error type for each status the server answers.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 429: "rate_limit_error", 500: "api_error",
               503: "overloaded_error"}


class TextBlock(BaseModel):
    type: Literal["text"]
    text: str


class ToolUseBlock(BaseModel):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict


class ToolResultBlock(BaseModel):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] = ""
    is_error: bool = False

    def text(self) -> str:
        body = self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)
        return f"Error: {body}" if self.is_error else body


Block = TextBlock | ToolUseBlock | ToolResultBlock


class Message(BaseModel):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class ToolSpec(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str = ""
    input_schema: dict


class ToolChoice(BaseModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class Thinking(BaseModel):
    """Extended thinking: only "disabled" is served (thinking blocks are not produced here)."""

    type: Literal["disabled"]
    budget_tokens: int | None = None


class CountTokensRequest(BaseModel):
    # Any field not served here is a 400 "not supported", never silently ignored; metadata and
    # service_tier change nothing about the reply.
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    metadata: dict | None = None
    service_tier: str | None = None
    thinking: Thinking | None = None
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[ToolSpec] | None = None

    def turns(self) -> list[Turn]:
        """The conversation as chat turns: a tool result becomes a ``tool`` turn, an assistant's
        ``tool_use`` its call."""
        system = self.system if isinstance(self.system, str) or self.system is None else \
            "".join(b.text for b in self.system)
        turns = [Turn("system", system)] if system else []
        for message in self.messages:
            if isinstance(message.content, str):
                turns.append(Turn(message.role, message.content))
                continue
            text = "".join(b.text for b in message.content if isinstance(b, TextBlock))
            calls = [ToolCall(b.name, json.dumps(b.input), b.id) for b in message.content
                     if isinstance(b, ToolUseBlock)]
            results = [b for b in message.content if isinstance(b, ToolResultBlock)]
            turns += [Turn("tool", r.text(), tool_call_id=r.tool_use_id) for r in results]
            if text or calls or not results:
                turns.append(Turn(message.role, text, calls))
        return turns

    def tool_list(self) -> list[Tool]:
        return [Tool(t.name, t.description, t.input_schema) for t in self.tools or []]


class MessagesRequest(CountTokensRequest):
    max_tokens: int
    stop_sequences: list[str] | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stream: bool = False
    tool_choice: ToolChoice | None = None

    def choice(self) -> tuple[str, bool]:
        """The chat tool choice (``none``, ``auto``, ``required``, a name) and whether calls may
        be parallel."""
        choice = self.tool_choice or ToolChoice(type="auto" if self.tools else "none")
        if choice.type == "tool" and not choice.name:
            raise APIError(400, "tool_choice of type tool needs a name", param="tool_choice")
        if choice.type != "none" and not self.tools:
            raise APIError(400, f"tool_choice {choice.type!r} needs tools", param="tool_choice")
        name = {"any": "required"}.get(choice.type, choice.type)
        return (choice.name if choice.type == "tool" else name), not choice.disable_parallel_tool_use

    def sampling_params(self) -> SamplingParams:
        try:
            return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                                  top_k=max(self.top_k, 0), stop=self.stop_sequences)
        except ValueError as e:
            field = str(e).split(" ", 1)[0]
            raise APIError(400, str(e), param={"stop": "stop_sequences"}.get(field, field)) from None


def prompt_ids(engine: AsyncEngine, body: CountTokensRequest, tools: list[Tool]) -> list[int]:
    try:
        return render(engine.tokenizer, body.turns(), tools, engine.tool_parser)
    except ValueError:
        raise APIError(400, f"model {engine.name!r} has no chat template", param="messages") from None


async def prepare(engine: AsyncEngine,
                  body: MessagesRequest) -> tuple[list[int], SamplingParams, ReplyReader]:
    """The prompt, the sampling parameters (with the tool-call grammar the choice asks for,
    compiled) and the reader of the reply."""
    params = body.sampling_params()
    tools, (choice, parallel) = body.tool_list(), body.choice()
    parser = engine.tool_parser if tools and choice != "none" else None
    if parser is not None:
        try:
            constraint = tool_constraint(tools, choice, parallel, parser, engine.special_tokens)
        except ValueError as e:
            raise APIError(400, str(e), param="tool_choice") from None
        params = replace(params, structured_outputs=constraint)
        try:
            await engine.check_structured_outputs(params)
        except ValueError as e:
            raise APIError(400, f"tools: {e}", param="tools") from None
    return prompt_ids(engine, body, tools if parser else []), params, ReplyReader(parser, engine.reasoning)


def stop_reason(out: RequestOutput, calls: list[ToolCall]) -> tuple[str, str | None]:
    """Anthropic's ``stop_reason`` and ``stop_sequence`` for a finished reply."""
    if out.finish_reason == "length":
        return "max_tokens", None
    if calls:
        return "tool_use", None
    if isinstance(out.stop_reason, str):
        return "stop_sequence", out.stop_reason
    return "end_turn", None


def usage(out: RequestOutput) -> dict:
    prompt, cached = len(out.prompt_token_ids), out.num_cached_tokens
    return {"input_tokens": prompt - cached, "output_tokens": len(out.token_ids),
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


def content_blocks(text: str, calls: list[ToolCall]) -> list[dict]:
    blocks = [{"type": "text", "text": text}] if text or not calls else []
    return blocks + [{"type": "tool_use", "id": c.id, "name": c.name, "input": json.loads(c.arguments)}
                     for c in calls]


async def answer(request: Request, stream: bool, model: str, first: RequestOutput, rest: RequestStream,
                 reader: ReplyReader, record) -> dict | StreamingResponse:
    """The whole message, or (``stream``) its events."""
    message_id = f"msg_{uuid.uuid4().hex[:24]}"

    async def last() -> RequestOutput:
        out = first
        async for out in rest:
            record.output(out)
        return out

    if not stream:
        try:
            out = await unless_client_leaves(request, last())
        finally:
            rest.close()
        if out.finish_reason == "abort":
            raise APIError(503, "the request was stopped before it finished (the server is shutting down)",
                           "overloaded_error")
        _, text, calls = reader.final(out.text)
        reason, sequence = stop_reason(out, calls)
        return {"id": message_id, "type": "message", "role": "assistant", "model": model,
                "content": content_blocks(text, calls), "stop_reason": reason, "stop_sequence": sequence,
                "usage": usage(out)}
    return StreamingResponse(events(message_id, model, first, rest, reader, record),
                             media_type="text/event-stream")


def _event(kind: str, payload: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind} | payload)}\n\n"


async def events(message_id: str, model: str, first: RequestOutput, rest: RequestStream, reader: ReplyReader,
                 record) -> AsyncIterator[str]:
    """Anthropic's event sequence: one text block streamed as it settles, then each tool call as a
    ``tool_use`` block whose input arrives as one ``input_json_delta``."""
    start = {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
             "stop_reason": None, "stop_sequence": None,
             "usage": usage(first) | {"output_tokens": 0}}
    yield _event("message_start", {"message": start})
    index, text_open, out, calls = 0, False, first, []
    try:
        async def outputs() -> AsyncIterator[RequestOutput]:
            yield first
            async for later in rest:
                record.output(later)
                yield later

        async for out in outputs():
            pieces = reader.delta(out.text)
            text = pieces.get("content", "")
            if out.finished:
                unsent, calls = reader.rest(out.text)
                text += unsent
            if text:
                if not text_open:
                    yield _event("content_block_start", {"index": index,
                                                         "content_block": {"type": "text", "text": ""}})
                    text_open = True
                yield _event("content_block_delta",
                             {"index": index, "delta": {"type": "text_delta", "text": text}})
        if out.finish_reason == "abort":
            raise RuntimeError("the request was stopped before it finished (the server is shutting down)")
        if text_open:
            yield _event("content_block_stop", {"index": index})
            index += 1
        for call in calls:
            yield _event("content_block_start", {"index": index, "content_block": {
                "type": "tool_use", "id": call.id, "name": call.name, "input": {}}})
            yield _event("content_block_delta", {"index": index, "delta": {
                "type": "input_json_delta", "partial_json": call.arguments}})
            yield _event("content_block_stop", {"index": index})
            index += 1
        reason, sequence = stop_reason(out, calls)
        yield _event("message_delta", {"delta": {"stop_reason": reason, "stop_sequence": sequence},
                                       "usage": {"output_tokens": len(out.token_ids)}})
        yield _event("message_stop", {})
    except Exception as e:  # an engine error or an abort mid-stream: Anthropic's error event
        yield _event("error", {"error": {"type": "api_error", "message": str(e)}})
    finally:  # a client that went away: abort what still runs, now
        rest.close()
