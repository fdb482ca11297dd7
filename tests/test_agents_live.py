"""Agents' clients against a live `pico-vllm serve`: the official `openai` client with structured
outputs and tool calls (required, named, auto, streamed, a tool-result round trip), and the
official `anthropic` client on the Messages API (text, streaming, tool_use, tool_result,
count_tokens, errors, x-api-key). The random model writes nonsense, so what is checked is what
the server guarantees: a demanded call is a valid call, a schema's output validates."""

from __future__ import annotations

import json
import signal

import anthropic
import jsonschema
import pytest
from openai import BadRequestError, OpenAI
from test_server_live import running_server, stop

WEATHER = {"type": "object", "required": ["city", "unit"], "additionalProperties": False,
           "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["C", "F"]}}}
OPENAI_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                                  "parameters": WEATHER}}]
ANTHROPIC_TOOLS = [{"name": "get_weather", "description": "Weather now", "input_schema": WEATHER}]


@pytest.fixture(scope="module")
def agent_server(chat_model):
    """Room for tool prompts (the tiny tokenizer spends a token per byte), behind a key."""
    with running_server(str(chat_model), "--api-key", "sekrit", "--num-blocks", "256",
                        "--max-model-len", "1024", "--served-model-name", "tiny") as (process, base):
        yield base
        stop(process, signal.SIGINT)


@pytest.fixture(scope="module")
def openai_client(agent_server) -> OpenAI:
    return OpenAI(base_url=f"{agent_server}/v1", api_key="sekrit", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def claude(agent_server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=agent_server, api_key="sekrit", max_retries=0, timeout=60)


ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]


def test_openai_structured_outputs(openai_client):
    schema_format = {"type": "json_schema",
                     "json_schema": {"name": "weather", "schema": WEATHER, "strict": True}}
    reply = openai_client.chat.completions.create(model="tiny", messages=ASK, max_tokens=80,
                                                  response_format=schema_format, temperature=1.0, seed=2)
    jsonschema.validate(json.loads(reply.choices[0].message.content), WEATHER)
    reply = openai_client.chat.completions.create(model="tiny", messages=ASK, max_tokens=200,
                                                  response_format={"type": "json_object"}, temperature=0)
    content = reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "length" or isinstance(json.loads(content), dict)
    choice = {"structured_outputs": {"choice": ["yes", "no"]}}
    reply = openai_client.chat.completions.create(model="tiny", messages=ASK, max_tokens=5, extra_body=choice)
    assert reply.choices[0].message.content in ("yes", "no")
    reply = openai_client.completions.create(model="tiny", prompt="Code:", max_tokens=12,
                                             extra_body={"guided_regex": "[A-Z]{3}-[0-9]{2}"})
    assert reply.choices[0].text[3] == "-" and len(reply.choices[0].text) == 6
    with pytest.raises(BadRequestError, match="response_format"):
        openai_client.chat.completions.create(model="tiny", messages=ASK, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}})


@pytest.mark.parametrize("stream", [False, True])
def test_openai_tool_calls_required_named_and_a_round_trip(openai_client, stream):
    def ask(messages, **kw):
        return openai_client.chat.completions.create(model="tiny", messages=messages, tools=OPENAI_TOOLS,
                                                     max_tokens=120, temperature=1.0, seed=4, stream=stream,
                                                     **kw)

    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        if stream:
            chunks = list(ask(ASK, tool_choice=choice))
            calls = [c for chunk in chunks for c in (chunk.choices[0].delta.tool_calls or [])]
            finish = chunks[-1].choices[0].finish_reason
            call_id, name, arguments = calls[0].id, calls[0].function.name, calls[0].function.arguments
        else:
            message = ask(ASK, tool_choice=choice).choices[0]
            finish, (call,) = message.finish_reason, message.message.tool_calls
            call_id, name, arguments = call.id, call.function.name, call.function.arguments
        assert finish == "tool_calls" and name == "get_weather"
        jsonschema.validate(json.loads(arguments), WEATHER)
    auto = ask(ASK, tool_choice="auto")  # the model may answer or call; a call is valid either way
    if not stream and auto.choices[0].message.tool_calls:
        jsonschema.validate(json.loads(auto.choices[0].message.tool_calls[0].function.arguments), WEATHER)
    # The result goes back as a tool message; the model answers (in text: tool_choice none).
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": '{"temp_c": 3}'}]
    answer = openai_client.chat.completions.create(model="tiny", messages=history, tools=OPENAI_TOOLS,
                                                   tool_choice="none", max_tokens=5)
    assert answer.choices[0].message.tool_calls is None
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_anthropic_text_streaming_and_count_tokens(claude):
    message = claude.messages.create(model="tiny", max_tokens=8, messages=ASK, system="Be brief.")
    assert message.role == "assistant" and message.content[0].type == "text"
    assert message.stop_reason in ("end_turn", "max_tokens") and message.usage.output_tokens <= 8
    # This SDK no longer sends temperature itself; the server still takes it.
    greedy = {"extra_body": {"temperature": 0}}
    with claude.messages.stream(model="tiny", max_tokens=8, messages=ASK, system="Be brief.",
                                **greedy) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    whole = claude.messages.create(model="tiny", max_tokens=8, messages=ASK, system="Be brief.", **greedy)
    assert text == final.content[0].text == whole.content[0].text
    count = claude.messages.count_tokens(model="tiny", messages=ASK, system="Be brief.")
    assert count.input_tokens == whole.usage.input_tokens + whole.usage.cache_read_input_tokens


def test_anthropic_tool_use_and_tool_result(claude):
    message = claude.messages.create(model="tiny", max_tokens=120, messages=ASK, tools=ANTHROPIC_TOOLS,
                                     tool_choice={"type": "any"})
    assert message.stop_reason == "tool_use"
    (use,) = [b for b in message.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.id.startswith("call_")
    jsonschema.validate(use.input, WEATHER)
    with claude.messages.stream(model="tiny", max_tokens=120, messages=ASK, tools=ANTHROPIC_TOOLS,
                                tool_choice={"type": "tool", "name": "get_weather"}) as stream:
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "tool_use"
    jsonschema.validate([b for b in streamed.content if b.type == "tool_use"][0].input, WEATHER)
    history = ASK + [{"role": "assistant", "content": [b.model_dump() for b in message.content]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                   "content": '{"temp_c": 3}'}]}]
    answer = claude.messages.create(model="tiny", max_tokens=5, messages=history, tools=ANTHROPIC_TOOLS,
                                    tool_choice={"type": "none"})
    assert answer.stop_reason in ("end_turn", "max_tokens")


def test_anthropic_errors_in_anthropics_shape(claude, agent_server):
    with pytest.raises(anthropic.BadRequestError) as bad:
        claude.messages.create(model="tiny", max_tokens=-1, messages=ASK)
    assert bad.value.body["type"] == "error" and bad.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="claude-nope", max_tokens=4, messages=ASK)
    wrong_key = anthropic.Anthropic(base_url=agent_server, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        wrong_key.messages.create(model="tiny", max_tokens=4, messages=ASK)
    with pytest.raises(anthropic.BadRequestError, match="tool_choice"):
        claude.messages.create(model="tiny", max_tokens=4, messages=ASK, tools=ANTHROPIC_TOOLS,
                               tool_choice={"type": "tool", "name": "unknown"})
