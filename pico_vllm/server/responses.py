"""How a generation request is answered: its choices submitted to the engine, then one JSON body
or a server-sent-event stream of their deltas, with logprobs and usage in OpenAI's shapes.

A client that goes away aborts its choices at once: a stream notices when a write fails; until a
response has started (waiting for the first token, or a non-streaming request) the request polls
``is_disconnected`` every ``DISCONNECT_POLL_S``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from dataclasses import replace
from typing import Protocol, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from pico_vllm.outputs import RequestOutput
from pico_vllm.sampling_params import SamplingParams
from pico_vllm.server.async_engine import AsyncEngine, RequestStream
from pico_vllm.server.chat import ReplyReader
from pico_vllm.server.metrics import RequestRecord
from pico_vllm.server.protocol import APIError, SamplingFields
from pico_vllm.tool_calls import ToolCall, ToolCallParser

T = TypeVar("T")

Stream = tuple[RequestOutput, RequestStream]  # a choice's first output, and the rest


async def start_choices(request: Request, engine: AsyncEngine, prompts: list, params: SamplingParams, n: int,
                 record: RequestRecord) -> list[Stream]:
    """Submit the ``n`` choices of each prompt (choice i of a prompt seeded ``seed + i``) and
    wait for each one's first output: a request the engine rejects fails here, before any byte
    is sent."""
    # Submitted before the first await, so admission control counts them before the next request.
    owner = getattr(request.state, "client", "")  # the API key or address the gate saw
    streams = [engine.generate(prompt, replace(params, seed=None if params.seed is None else params.seed + i),
                               owner)
               for prompt in prompts for i in range(n)]

    async def first_outputs() -> list[RequestOutput]:
        return [await anext(stream) for stream in streams]

    try:
        firsts = await unless_client_leaves(request, first_outputs())
    except BaseException as e:  # rejected, or the client left: abort the choices
        for stream in streams:
            stream.close()
        if isinstance(e, ValueError):
            raise APIError(400, str(e), param="prompt") from None
        raise
    for first in firsts:
        record.output(first)
    record.first_tokens(sum(len(first.prompt_token_ids) for first in firsts[::n]))
    return list(zip(firsts, streams))


LogprobFormat = Callable[[RequestOutput, int], dict]


def logprob_format(engine: AsyncEngine, chat: bool) -> LogprobFormat:
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


def _usage(outs: list[RequestOutput], body: SamplingFields) -> dict:
    """Usage of a request's choices, ``n`` per prompt (each prompt counted once); with a
    prediction, how many of its tokens were kept and rejected, as OpenAI reports them."""
    n = body.n
    prompt = sum(len(out.prompt_token_ids) for out in outs[::n])
    completion = sum(len(out.token_ids) for out in outs)
    cached = sum(out.num_cached_tokens for out in outs[::n])  # the prefix cache's share of the prompt
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
             "prompt_tokens_details": {"cached_tokens": cached}}
    if body.predicted_text() is not None:
        kept = sum(out.num_accepted_draft_tokens for out in outs)
        usage["completion_tokens_details"] = {
            "accepted_prediction_tokens": kept,
            "rejected_prediction_tokens": sum(out.num_draft_tokens for out in outs) - kept}
    return usage


class ClientGone(Exception):
    """The client disconnected before its response started (answered 499, which nobody reads)."""


DISCONNECT_POLL_S = 0.5  # how often a request not yet answering checks that its client is still there


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """``await work``, cancelled (aborting its requests) if the client disconnects first: until
    a response starts, nothing else would notice (a stream notices when a write fails)."""
    task = asyncio.ensure_future(work)
    try:
        while not (await asyncio.wait({task}, timeout=DISCONNECT_POLL_S))[0]:
            if await request.is_disconnected():
                raise ClientGone
    finally:
        if not task.done():
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
    return task.result()


class Reply(Protocol):
    """What one endpoint puts in its choices: ``kind`` ("text_completion", "chat.completion"),
    a streamed chunk's fields (``first``: the choice's first chunk), a whole reply's fields, and
    the logprobs format when the request asked for logprobs."""

    kind: str
    logprobs: LogprobFormat | None

    def delta_choice(self, out: RequestOutput, first: bool) -> dict: ...

    def final_choice(self, out: RequestOutput) -> dict: ...


async def respond(request: Request, body: SamplingFields, model: str, streams: list[Stream], reply: Reply,
                  record: RequestRecord):
    """A JSON body with every choice's final output, or an SSE stream of the choices' deltas as
    they come; ``record`` sees every output after the first. A client that goes away aborts
    the request: a stream notices when its next write fails, a JSON request polls."""
    kind, logprobs = reply.kind, reply.logprobs
    request_id = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if not body.stream:
        async def last(first: RequestOutput, rest: RequestStream) -> RequestOutput:
            out = first
            async for out in rest:
                record.output(out)
            return out

        try:
            outs = await unless_client_leaves(
                request, asyncio.gather(*(last(first, rest) for first, rest in streams)))
        finally:  # the client left: abort what still runs
            for _, rest in streams:
                rest.close()
        choices = []
        for index, out in enumerate(outs):
            choices.append({"index": index, "finish_reason": out.finish_reason,
                            "logprobs": logprobs(out, len(out.token_ids)) if logprobs else None}
                           | reply.final_choice(out))
        return {"id": request_id, "object": kind, "created": created, "model": model,
                "choices": choices, "usage": _usage(outs, body)}

    chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else kind

    def event(choices: list, usage: dict | None = None) -> str:
        payload = {"id": request_id, "object": chunk_kind, "created": created, "model": model,
                   "choices": choices}
        if usage is not None:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"

    async def events() -> AsyncIterator[str]:
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, first: RequestOutput, rest: RequestStream) -> None:
            try:
                await merged.put((index, first))
                async for out in rest:
                    record.output(out)
                    await merged.put((index, out))
            except Exception as e:  # handed to the consumer, which ends the stream with it
                await merged.put((index, e))

        pumps = [asyncio.create_task(pump(i, first, rest)) for i, (first, rest) in enumerate(streams)]
        finals: dict[int, RequestOutput] = {}
        started: set[int] = set()  # choices whose first chunk went out
        try:
            if kind == "chat.completion":
                yield event([{"delta": {"role": "assistant", "content": ""}, "index": i,
                              "finish_reason": None} for i in range(len(streams))])
            while len(finals) < len(streams):
                index, out = await merged.get()
                if isinstance(out, Exception):
                    raise out
                choice = ({"index": index, "finish_reason": out.finish_reason}
                          | reply.delta_choice(out, first=index not in started))
                started.add(index)
                if logprobs:
                    choice["logprobs"] = logprobs(out, len(out.delta_token_ids))
                yield event([choice])
                if out.finished:
                    finals[index] = out
            if body.stream_options and body.stream_options.include_usage:
                yield event([], _usage([finals[i] for i in range(len(streams))], body))
        except Exception as e:  # an engine error mid-stream: an error chunk, then the end
            error = {"message": str(e), "type": "server_error", "param": None, "code": 500}
            yield f"data: {json.dumps({'error': error})}\n\n"
        finally:  # a client that went away: abort what is still running, now (before any await:
            for _, rest in streams:  # in a cancelled task, anyio cancels each await here)
                rest.close()
            for task in pumps:
                task.cancel()
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


class CompletionReplies:
    """What a text completion sends: the text (after the prompt, with ``echo``, in a choice's
    first chunk or its whole reply)."""

    kind = "text_completion"

    def __init__(self, echoed: Callable[[RequestOutput], str], logprobs: LogprobFormat | None) -> None:
        self.echoed, self.logprobs = echoed, logprobs

    def delta_choice(self, out: RequestOutput, first: bool) -> dict:
        return {"text": (self.echoed(out) if first else "") + out.delta_text}

    def final_choice(self, out: RequestOutput) -> dict:
        return {"text": self.echoed(out) + out.text}


class ChatReplies:
    """What a chat reply sends, choice by choice: content, ``reasoning_content`` and
    ``tool_calls`` (``finish_reason`` ``tool_calls`` when it called), streamed or whole."""

    kind = "chat.completion"

    def __init__(self, parser: ToolCallParser | None, reasoning: bool,
                 logprobs: LogprobFormat | None) -> None:
        self.parser, self.reasoning, self.logprobs = parser, reasoning, logprobs
        self.readers: dict[str, ReplyReader] = {}

    def _reader(self, out: RequestOutput) -> ReplyReader:
        return self.readers.setdefault(out.request_id, ReplyReader(self.parser, self.reasoning))

    def delta_choice(self, out: RequestOutput, first: bool) -> dict:
        reader = self._reader(out)
        pieces = reader.delta(out.text)
        delta = {"reasoning_content": pieces.get("reasoning"), "content": pieces.get("content")}
        choice = {}
        if out.finished:
            rest, calls = reader.rest(out.text)
            delta["content"] = (delta["content"] or "") + rest or None
            if calls:
                delta["tool_calls"] = [_call_json(c) | {"index": i} for i, c in enumerate(calls)]
                choice["finish_reason"] = _finish_reason(out, calls)
        choice["delta"] = {k: v for k, v in delta.items() if v is not None}
        return choice

    def final_choice(self, out: RequestOutput) -> dict:
        reasoning, content, calls = self._reader(out).final(out.text)
        message = {"role": "assistant", "content": content if content or not calls else None}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = [_call_json(c) for c in calls]
        return {"message": message, "finish_reason": _finish_reason(out, calls)}


def _call_json(call: ToolCall) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _finish_reason(out: RequestOutput, calls: list[ToolCall]) -> str | None:
    return "tool_calls" if calls and out.finish_reason == "stop" else out.finish_reason
