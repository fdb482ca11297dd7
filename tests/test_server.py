"""`pico-vllm serve`: OpenAI-shaped endpoints over the engine thread, streaming, errors, aborts."""

from __future__ import annotations

import asyncio
import json
import time

import jsonschema
import pytest
from fastapi.testclient import TestClient
from server_load import prometheus_sum

from pico_vllm import LLM, EngineConfig, SamplingParams
from pico_vllm.server.app import create_app
from pico_vllm.server.async_engine import AsyncEngine


@pytest.fixture(scope="module")
def model_dir(chat_model) -> str:
    return str(chat_model)


@pytest.fixture(scope="module")
def engines(model_dir):
    served = [AsyncEngine(EngineConfig(model=model_dir, num_blocks=64, max_model_len=256), "tiny")]
    yield served
    for engine in served:
        engine.shutdown()


@pytest.fixture(scope="module")
def client(engines):
    with TestClient(create_app(engines, api_key=None, max_queue=8)) as c:
        yield c


def assert_error(response, status: int, message: str, kind: str = "invalid_request_error"):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["type"] == kind and error["code"] == status


def sse(response) -> list:
    lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def test_health_and_models(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny"]


def test_completion_equals_the_offline_engine(client, model_dir):
    body = {"prompt": [5, 6, 7], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200
    data = response.json()
    offline = LLM(model_dir, num_blocks=64).generate([5, 6, 7], SamplingParams(
        temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    assert data["choices"][0]["text"] == offline.text
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"] == {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11,
                             "prompt_tokens_details": {"cached_tokens": 0}}


@pytest.mark.parametrize("as_ids", [False, True])
def test_echo_puts_the_prompt_before_the_completion(client, engines, as_ids):
    prompt = engines[0].tokenizer.encode("Hello") if as_ids else "Hello"
    body = {"prompt": prompt, "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    plain = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    echoed = client.post("/v1/completions", json=body | {"echo": True}).json()["choices"][0]["text"]
    assert echoed == "Hello" + plain
    with client.stream("POST", "/v1/completions", json=body | {"echo": True, "stream": True}) as response:
        assert "".join(c["choices"][0]["text"] for c in sse(response)) == "Hello" + plain


def test_streamed_completion_adds_up_and_ends_with_a_finish_reason(client):
    body = {"prompt": "Hello", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json=body | {
            "stream": True, "stream_options": {"include_usage": True}}) as response:
        chunks = sse(response)
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert "".join(c["text"] for c in choices) == whole
    assert choices[-1]["finish_reason"] == "length" and all(c["finish_reason"] is None for c in choices[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


def test_n_choices_are_seeded_apart_and_stream_interleaved(client):
    body = {"prompt": "Hi", "max_tokens": 6, "temperature": 1.0, "seed": 7, "n": 3, "ignore_eos": True}
    data = client.post("/v1/completions", json=body).json()
    texts = [c["text"] for c in data["choices"]]
    assert [c["index"] for c in data["choices"]] == [0, 1, 2] and len(set(texts)) > 1
    assert data["usage"]["completion_tokens"] == 18
    single = client.post("/v1/completions", json=body | {"n": 1, "seed": 8}).json()
    assert single["choices"][0]["text"] == texts[1]  # choice i is seeded seed + i
    with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as response:
        chunks = sse(response)
    streamed = {i: "" for i in range(3)}
    for chunk in chunks:
        choice = chunk["choices"][0]
        streamed[choice["index"]] += choice["text"]
    assert [streamed[i] for i in range(3)] == texts
    finished = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(finished) == [0, 1, 2]


@pytest.mark.parametrize("prompts", [["Hello", "Good day"], [[5, 6, 7], [8, 9]]])
def test_a_list_of_prompts_gives_their_choices_prompt_by_prompt(client, prompts):
    body = {"max_tokens": 4, "temperature": 0, "ignore_eos": True}
    alone = [client.post("/v1/completions", json=body | {"prompt": p}).json() for p in prompts]
    data = client.post("/v1/completions", json=body | {"prompt": prompts, "n": 2}).json()
    assert [c["index"] for c in data["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in data["choices"]] == [a["choices"][0]["text"] for a in alone for _ in range(2)]
    assert data["usage"]["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in alone)
    assert data["usage"]["completion_tokens"] == 16
    streaming = body | {"prompt": prompts, "stream": True}
    with client.stream("POST", "/v1/completions", json=streaming) as response:
        chunks = sse(response)
    streamed = {0: "", 1: ""}
    for chunk in chunks:
        streamed[chunk["choices"][0]["index"]] += chunk["choices"][0]["text"]
    assert [streamed[0], streamed[1]] == [a["choices"][0]["text"] for a in alone]


def test_chat_completion_with_text_parts(client):
    parts = [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]
    messages = [{"role": "user", "content": parts}]
    body = {"messages": messages, "max_completion_tokens": 5, "temperature": 0, "ignore_eos": True}
    data = client.post("/v1/chat/completions", json=body).json()
    assert data["object"] == "chat.completion" and data["choices"][0]["message"]["role"] == "assistant"
    assert data["usage"]["completion_tokens"] == 5
    with client.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as response:
        chunks = sse(response)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    streamed = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    assert streamed == data["choices"][0]["message"]["content"]


@pytest.mark.parametrize("path,body,status,message", [
    ("/v1/completions", {"prompt": "Hi", "temperature": -1}, 400, "temperature must be >= 0"),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt: Field required"),
    ("/v1/completions", [1, 2], 400, "request body"),
    ("/v1/completions", {"prompt": "Hi", "n": 0}, 400, "n must be in [1, 16], got 0"),
    ("/v1/completions", {"prompt": [1] * 300}, 400, "exceeds max_model_len"),
    ("/v1/completions", {"prompt": "Hi", "model": "gpt-9"}, 404, "model 'gpt-9' is not served here"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
])
def test_bad_requests_get_openai_shaped_errors_and_the_server_keeps_serving(client, path, body, status,
                                                                            message):
    kind = "not_found_error" if status == 404 else "invalid_request_error"
    assert_error(client.post(path, json=body), status, message, kind)
    ok = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200


def test_errors_outside_the_routes_are_in_openai_shape_too(client):
    assert_error(client.get("/v1/nothing"), 404, "no route GET /v1/nothing", "not_found_error")
    wrong = client.get("/v1/completions")
    assert_error(wrong, 405, "GET is not allowed on /v1/completions (allowed: POST)")
    broken = client.post("/v1/completions", content=b'{"prompt": "Hi",',
                         headers={"Content-Type": "application/json"})
    assert_error(broken, 400, "request body is not valid JSON")
    assert broken.json()["error"]["param"] is None


@pytest.mark.parametrize("body,param,message", [
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs",
     "top_logprobs must be None or an int in [0, 20], got 21"),
    ({"max_completion_tokens": 0}, "max_completion_tokens", "max_completion_tokens must be >= 1, got 0"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens must be >= 1, got 0"),
])
def test_a_chat_error_names_the_field_as_the_request_spelled_it(client, body, param, message):
    messages = [{"role": "user", "content": "Hi"}]
    response = client.post("/v1/chat/completions", json={"messages": messages} | body)
    assert_error(response, 400, message)
    assert response.json()["error"]["param"] == param


def test_with_several_models_a_request_must_name_one(engines, model_dir):
    other = AsyncEngine(EngineConfig(model=model_dir, num_blocks=16, max_model_len=64), "other")
    try:
        with TestClient(create_app([*engines, other])) as c:
            assert_error(c.post("/v1/completions", json={"prompt": "Hi"}), 400,
                         "model is required when several models are served: tiny, other")
            named = c.post("/v1/completions", json={"prompt": "Hi", "model": "other", "max_tokens": 2})
            assert named.status_code == 200 and named.json()["model"] == "other"
    finally:
        other.shutdown()


def test_api_key_guards_v1_but_not_health(engines):
    with TestClient(create_app(engines, api_key="sekrit")) as c:
        assert c.get("/health").status_code == 200
        assert_error(c.get("/v1/models"), 401, "API key", "authentication_error")
        assert c.get("/v1/models", headers={"Authorization": "Bearer sekrit"}).status_code == 200


def test_a_full_queue_answers_429_with_retry_after(engines):
    with TestClient(create_app(engines, max_queue=1)) as c:
        engine = engines[0]
        assert_error(c.post("/v1/completions", json={"prompt": "Hi", "n": 2}), 429, "at capacity",
                     "rate_limit_error")  # two choices never fit a queue of 1
        engine._live_by_owner["elsewhere"] += 1  # one request in flight fills a queue of 1
        try:
            response = c.post("/v1/completions", json={"prompt": "Hi"})
        finally:
            del engine._live_by_owner["elsewhere"]
        assert_error(response, 429, "at capacity", "rate_limit_error")
        assert response.headers["Retry-After"] == "1"
        assert 'pico_vllm_rejected_requests_total{reason="queue_full"} 2.0' in c.get("/metrics").text


def test_leaving_a_stream_aborts_the_request_and_frees_its_blocks(engines):
    engine = engines[0]
    manager = engine.engine.scheduler.block_manager
    before = engine.engine.stats.generated_tokens

    async def read_one_then_leave() -> None:
        stream = engine.generate([9, 9, 9], SamplingParams(max_tokens=250, ignore_eos=True))
        await anext(stream)
        stream.close()  # what the server does when the client disconnects
        deadline = time.monotonic() + 10
        while (engine.num_requests or manager.num_free_blocks != manager.num_blocks) \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    asyncio.run(read_one_then_leave())
    assert engine.num_requests == 0 and manager.num_free_blocks == manager.num_blocks
    assert engine.engine.stats.generated_tokens - before < 250, "the request ran to its end"


def test_metrics_count_finished_requests_and_tokens(client):
    before = client.get("/metrics").text
    client.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 4, "ignore_eos": True})
    after = client.get("/metrics").text
    client.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 1, "n": 3})
    assert prometheus_sum(client.get("/metrics").text, "pico_vllm_prompt_tokens_total") - \
        prometheus_sum(after, "pico_vllm_prompt_tokens_total") == 3  # a prompt counts once, whatever n
    for name, grew_by in (("pico_vllm_generation_tokens_total", 4), ("pico_vllm_prompt_tokens_total", 2),
                          ("pico_vllm_requests_total", 1),
                          ("pico_vllm_time_to_first_token_seconds_count", 1),
                          ("pico_vllm_inter_token_latency_seconds_count", 3),  # tokens after the first
                          ("pico_vllm_e2e_request_latency_seconds_count", 1)):
        assert prometheus_sum(after, name) - prometheus_sum(before, name) == grew_by, name
    # Between requests nothing runs or waits, and no block is held (cached blocks count as free).
    for name in ("pico_vllm_requests_in_flight", "pico_vllm_requests_running",
                 "pico_vllm_requests_waiting", "pico_vllm_kv_blocks_used"):
        assert prometheus_sum(after, name) == 0, name
    assert prometheus_sum(after, "pico_vllm_kv_blocks_total") == 64
    assert "pico_vllm_prefix_cache_hit_tokens" in after and "pico_vllm_preemptions" in after


def test_tokenize_and_detokenize_round_trip(client):
    tokens = client.post("/tokenize", json={"prompt": "Hello there"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0 and tokens["max_model_len"] == 256
    assert client.post("/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": "Hello there"}
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert client.post("/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"].endswith("assistant:")
    assert_error(client.post("/detokenize", json={"tokens": [10**6]}), 400, "outside the vocabulary")
    assert_error(client.post("/tokenize", json={}), 400, "exactly one of prompt and messages")


def test_rate_limit_per_key_answers_429_with_retry_after(engines):
    with TestClient(create_app(engines, rate_limit=0.5)) as c:
        body = {"prompt": "Hi", "max_tokens": 1}
        assert c.post("/v1/completions", json=body, headers={"Authorization": "Bearer k1"}).status_code == 200
        limited = c.post("/v1/completions", json=body, headers={"Authorization": "Bearer k1"})
        assert_error(limited, 429, "rate limit of 0.5 requests/s", "rate_limit_error")
        assert limited.headers["Retry-After"] == "2"
        # another key has its own bucket; reads are not limited
        assert c.post("/v1/completions", json=body, headers={"Authorization": "Bearer k2"}).status_code == 200
        assert c.get("/v1/models", headers={"Authorization": "Bearer k1"}).status_code == 200


def test_shutting_down_answers_503_but_health_stays_up(engines):
    app = create_app(engines)
    with TestClient(app) as c:
        app.state.server.closing = True
        assert_error(c.post("/v1/completions", json={"prompt": "Hi"}), 503, "shutting down", "server_error")
        assert c.get("/health").status_code == 200


def test_a_client_leaving_an_http_stream_aborts_its_choices(model_dir):
    # A long budget (2 x 1000 tokens, seconds of work) so that the choices are surely still
    # running when the disconnect arrives, however slowly the test client delivers it.
    engine = AsyncEngine(EngineConfig(model=model_dir, num_blocks=160, max_model_len=1024), "long")
    try:
        manager = engine.engine.scheduler.block_manager
        body = {"prompt": [9, 9], "max_tokens": 1000, "ignore_eos": True, "stream": True, "n": 2}
        with TestClient(create_app([engine])) as client:  # stays up: only the stream hangs up
            with client.stream("POST", "/v1/completions", json=body) as response:
                next(response.iter_lines())  # the first chunk arrived; now hang up
            deadline = time.monotonic() + 10
            while (engine.num_requests or manager.num_free_blocks != manager.num_blocks) \
                    and time.monotonic() < deadline:
                time.sleep(0.02)
            assert engine.num_requests == 0 and manager.num_free_blocks == manager.num_blocks
        assert engine.engine.stats.generated_tokens < 2000, "the choices ran to their end"
    finally:
        engine.shutdown()


def test_logprobs_in_completions_and_chat_streamed_or_not(client, model_dir):
    body = {"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0, "ignore_eos": True, "logprobs": 2}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    offline = LLM(model_dir, num_blocks=64).generate([5, 6, 7], SamplingParams(
        temperature=0, max_tokens=4, ignore_eos=True, logprobs=2), use_tqdm=False)[0]
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(offline.logprobs, abs=1e-5)
    assert len(choice["logprobs"]["tokens"]) == 4 and "".join(choice["logprobs"]["tokens"]) == choice["text"]
    assert all(len(top) <= 2 for top in choice["logprobs"]["top_logprobs"])
    with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as response:
        chunks = sse(response)
    streamed = [lp for c in chunks for lp in c["choices"][0]["logprobs"]["token_logprobs"]]
    assert streamed == pytest.approx(offline.logprobs, abs=1e-5)

    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0,
            "ignore_eos": True, "logprobs": True, "top_logprobs": 2}
    content = client.post("/v1/chat/completions", json=chat).json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    for entry in content:  # greedy: the chosen token is the most likely one
        assert entry["top_logprobs"][0]["token"] == entry["token"]
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"])
        assert bytes(entry["bytes"]).decode() == entry["token"]
    assert_error(client.post("/v1/chat/completions", json=chat | {"logprobs": False}), 400,
                 "top_logprobs needs logprobs: true")


PET = {"type": "object", "required": ["kind", "age"], "additionalProperties": False,
       "properties": {"kind": {"enum": ["cat", "dog"]},
                      "age": {"type": "integer", "minimum": 0, "maximum": 30}}}


@pytest.mark.parametrize("fields,check", [
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "pet", "schema": PET, "strict": True}}},
     lambda text: json.loads(text)["kind"] in ("cat", "dog")),
    ({"response_format": {"type": "json_object"}}, lambda text: isinstance(json.loads(text), dict)),
    ({"structured_outputs": {"choice": ["red", "green"]}}, lambda text: text in ("red", "green")),
    ({"guided_regex": "[0-9]{3}-[0-9]{2}"}, lambda text: len(text) == 6 and text[3] == "-"),
    ({"guided_json": PET}, lambda text: set(json.loads(text)) == {"kind", "age"}),
    ({"guided_choice": ["up", "down"]}, lambda text: text in ("up", "down")),
])
def test_chat_holds_the_answer_to_the_requested_format(client, fields, check):
    body = {"messages": [{"role": "user", "content": "Answer."}], "max_tokens": 120, "temperature": 1.0,
            "seed": 3} | fields
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    if choice["finish_reason"] == "stop":
        assert check(choice["message"]["content"]), choice["message"]["content"]
    else:
        assert choice["finish_reason"] == "length"


def test_completions_take_structured_outputs_and_stream_them(client):
    body = {"prompt": [5, 6, 7], "max_tokens": 40, "temperature": 0, "stream": True,
            "structured_outputs": {"regex": "(yes|no), [a-z]{3}"}}
    with client.stream("POST", "/v1/completions", json=body) as response:
        chunks = sse(response)
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert text.split(", ")[0] in ("yes", "no") and len(text.split(", ")[1]) == 3


@pytest.mark.parametrize("fields,param,message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/no"}}}},
     "response_format", "response_format: json: "),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format",
     "json_schema.schema is required"),
    ({"guided_regex": "(unclosed"}, "guided_regex", "guided_regex: regex: "),
    ({"structured_outputs": {"grammar": "start: nope"}}, "structured_outputs",
     "structured_outputs: grammar: "),
    ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_regex", "give one output constraint"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "response_format.type"),
])
def test_a_bad_output_constraint_is_a_400_naming_the_field(client, fields, param, message):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4} | fields
    response = client.post("/v1/chat/completions", json=body)
    assert_error(response, 400, message)
    assert response.json()["error"]["param"] == param
    assert client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                      "max_tokens": 2}).status_code == 200


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}}, "required": ["zone"],
    "additionalProperties": False}}}


@pytest.fixture(scope="module")
def tool_client(model_dir):
    """A server with room for the tool prompt (the tiny tokenizer spends a token per byte)."""
    engine = AsyncEngine(EngineConfig(model=model_dir, num_blocks=256, max_model_len=1024), "tiny")
    with TestClient(create_app([engine], api_key=None, max_queue=8)) as c:
        yield c
    engine.shutdown()


def chat_with_tools(client, **fields):
    body = {"messages": [{"role": "user", "content": "Weather in Oslo?"}], "max_tokens": 120,
            "tools": [WEATHER_TOOL, TIME_TOOL], "temperature": 0} | fields
    return client.post("/v1/chat/completions", json=body)


@pytest.mark.parametrize("tool_choice,names", [
    ("required", {"get_weather", "get_time"}),
    ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
])
def test_a_demanded_tool_call_comes_back_valid_in_openai_shape(tool_client, tool_choice, names):
    response = chat_with_tools(tool_client, tool_choice=tool_choice, parallel_tool_calls=False)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_") and call["function"]["name"] in names
    arguments = json.loads(call["function"]["arguments"])
    tool = WEATHER_TOOL if call["function"]["name"] == "get_weather" else TIME_TOOL
    schema = tool["function"]["parameters"]
    jsonschema.validate(arguments, schema)


def test_a_streamed_tool_call_arrives_whole_with_its_id_and_name(tool_client):
    body = {"messages": [{"role": "user", "content": "Weather?"}], "max_tokens": 120, "stream": True,
            "tools": [WEATHER_TOOL], "tool_choice": "required", "temperature": 1.0, "seed": 5}
    with tool_client.stream("POST", "/v1/chat/completions", json=body) as response:
        chunks = sse(response)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    calls = [call for d in deltas for call in d.get("tool_calls", [])]
    assert len(calls) >= 1 and calls[0]["index"] == 0 and calls[0]["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), WEATHER_TOOL["function"]["parameters"])
    assert not any(d.get("content") for d in deltas)  # the call's text is not sent as content
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_tool_result_round_trip_renders_and_answers(tool_client):
    call = {"id": "call_abc", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "C"}'}}
    messages = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_abc", "content": '{"temp": 4}'}]
    response = chat_with_tools(tool_client, messages=messages, max_tokens=8)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
    assert response.json()["usage"]["prompt_tokens"] > 200  # the tool prompt, the call and its result


@pytest.mark.parametrize("fields,param,message", [
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools.0.function.name",
     "should match pattern"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/missing"}}}}}], "tool_choice": "required"},
     "tools", "tools: grammar: "),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "tool_choice names 'nope', which is not among the tools"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice", "tool_choice 'required' needs tools"),
    ({"response_format": {"type": "json_object"}}, "response_format", "tools and response_format cannot"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "get_weather", "arguments": "{oops"}}]}]}, "messages", "arguments are not JSON"),
])
def test_bad_tool_requests_are_400s_naming_the_field(tool_client, fields, param, message):
    response = chat_with_tools(tool_client, **fields)
    assert_error(response, 400, message)
    assert response.json()["error"]["param"] == param


def test_tool_choice_none_and_auto_answer_in_text(tool_client):
    for choice in ("none", "auto"):
        response = chat_with_tools(tool_client, tool_choice=choice, max_tokens=6, temperature=0)
        choice_json = response.json()["choices"][0]
        assert response.status_code == 200
        assert choice_json["finish_reason"] in ("stop", "length", "tool_calls")


def test_a_speculative_server_answers_what_the_plain_one_does_and_reports_its_drafts(client, model_dir):
    engine = AsyncEngine(EngineConfig(model=model_dir, num_blocks=64, max_model_len=256,
                                      speculative_config={"method": "ngram", "prompt_lookup_min": 1}), "spec")
    body = {"prompt": [5, 6, 7, 8, 9] * 4, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    try:
        with TestClient(create_app([engine], api_key=None, max_queue=8)) as spec:
            got = spec.post("/v1/completions", json=body | {"model": "spec"}).json()
            metrics = spec.get("/metrics").text
    finally:
        engine.shutdown()
    expected = client.post("/v1/completions", json=body).json()
    assert got["choices"] == expected["choices"] and got["usage"] == expected["usage"]
    drafted = prometheus_sum(metrics, "pico_vllm_spec_decode_draft_tokens")
    kept = prometheus_sum(metrics, "pico_vllm_spec_decode_accepted_tokens")
    assert drafted > kept > 0 and prometheus_sum(metrics, "pico_vllm_spec_decode_verified_runs") > 0
    assert kept == engine.engine.stats.accepted_draft_tokens


def test_a_predicted_chat_reply_is_the_same_reply_and_usage_counts_the_prediction(client, engines):
    """(The random model's text does not tokenize back to its tokens, so few drafts are kept here;
    tests/test_predicted_outputs.py keeps them with the embedded model.)"""
    stats = engines[0].engine.stats
    body = {"messages": [{"role": "user", "content": "Copy this"}], "max_tokens": 24, "temperature": 0,
            "ignore_eos": True}
    plain = client.post("/v1/chat/completions", json=body).json()
    reply = plain["choices"][0]["message"]["content"]
    assert "completion_tokens_details" not in plain["usage"]
    wrong = reply[:10] + "XYZ" + reply[14:]
    for prediction, parts in ((reply, False), (wrong, False), (reply, True)):
        content = [{"type": "text", "text": prediction[:5]}, {"type": "text", "text": prediction[5:]}]
        predicted = body | {"prediction": {"type": "content", "content": content if parts else prediction}}
        drafted, kept = stats.draft_tokens, stats.accepted_draft_tokens
        data = client.post("/v1/chat/completions", json=predicted).json()
        assert data["choices"] == plain["choices"]
        details = data["usage"].pop("completion_tokens_details")
        assert data["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"] == 24
        kept, drafted = stats.accepted_draft_tokens - kept, stats.draft_tokens - drafted
        assert details == {"accepted_prediction_tokens": kept, "rejected_prediction_tokens": drafted - kept}
        assert details["rejected_prediction_tokens"] > 0
    with client.stream("POST", "/v1/chat/completions", json=predicted | {
            "stream": True, "stream_options": {"include_usage": True}}) as response:
        chunks = sse(response)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == reply
    assert chunks[-1]["usage"]["completion_tokens_details"] == details
    bad = body | {"prediction": {"type": "text", "content": "x"}}
    assert_error(client.post("/v1/chat/completions", json=bad), 400, "prediction.type")
