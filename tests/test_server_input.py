"""Hostile or unsupported input gets a 4xx naming the field, never a 5xx, a hang or a silently
ignored parameter; the API key is read without showing in the process list."""

from __future__ import annotations

import argparse

import pytest
from fastapi.testclient import TestClient

from pico_vllm import EngineConfig
from pico_vllm.cli import _api_key
from pico_vllm.server.app import create_app
from pico_vllm.server.async_engine import AsyncEngine

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
ANTHROPIC = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def client(chat_model):
    engine = AsyncEngine(EngineConfig(model=str(chat_model), num_blocks=32, max_model_len=128), "tiny")
    with TestClient(create_app([engine], max_request_bytes=4096)) as c:
        yield c
    engine.shutdown()


def openai_error(response, status: int, message: str, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] == message and error["code"] == status
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize("path,field", [
    ("/v1/chat/completions", "logit_bias"), ("/v1/chat/completions", "reasoning_effort"),
    ("/v1/chat/completions", "functions"), ("/v1/completions", "suffix"), ("/v1/completions", "best_of"),
])
def test_a_field_this_server_does_not_implement_is_a_400_not_silence(client, path, field):
    body = CHAT if path.endswith("chat/completions") else {"prompt": "Hi", "max_tokens": 2}
    response = client.post(path, json=body | {field: 1})
    openai_error(response, 400, f"{field}: not supported by this server", field)


def test_fields_that_change_nothing_are_accepted(client):
    body = CHAT | {"user": "u1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto",
                   "prompt_cache_key": "c", "safety_identifier": "s"}
    assert client.post("/v1/chat/completions", json=body).status_code == 200


def test_image_parts_and_unknown_roles_are_named(client):
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}
    response = client.post("/v1/chat/completions", json=CHAT | {"messages": [image]})
    assert response.status_code == 400
    assert "content parts of type 'image_url' are not supported by this model (text only)" in \
        response.json()["error"]["message"]
    wizard = {"messages": [{"role": "wizard", "content": "x"}]}
    wizard = client.post("/v1/chat/completions", json=CHAT | wizard)
    assert wizard.status_code == 400 and wizard.json()["error"]["param"] == "messages.0.role"


def test_a_body_over_the_limit_is_a_413_declared_or_streamed(client):
    big = CHAT | {"messages": [{"role": "user", "content": "x" * 5000}]}
    openai_error(client.post("/v1/chat/completions", json=big), 413,
                 "request body is over the server's limit of 4096 bytes (--max-request-bytes)")

    def chunks():  # no Content-Length: the limit is counted as the body arrives
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}]}'

    response = client.post("/v1/chat/completions", content=chunks(), headers=JSON)
    assert response.status_code == 413
    anthropic = client.post("/v1/messages", json=ANTHROPIC | {"system": "y" * 5000})
    assert anthropic.status_code == 413 and anthropic.json()["type"] == "error"
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


@pytest.mark.parametrize("content,message", [
    (b"[" * 2000 + b"]" * 2000, "request body"),  # nesting deeper than the parser's recursion
    (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', "request body"),  # not UTF-8
    (b'{"messages": "no"}', "messages"),
    (b'{"messages": [{"role": "user", "content": "x"}], "n": "many"}', "n"),
    (b'{"messages": [{"role": "user", "content": "x"}], "n": 1000}', "n must be in [1, 16], got 1000"),
    (b'{"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 500}',
     "top_logprobs must be None or an int in [0, 20], got 500"),
])
def test_malformed_bodies_are_400s(client, content, message):
    response = client.post("/v1/chat/completions", content=content, headers=JSON)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


def test_anthropic_fields_not_served_are_400s_in_its_shape(client):
    for extra, field in (({"container": "c"}, "container"),
                         ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking.type")):
        response = client.post("/v1/messages", json=ANTHROPIC | extra)
        assert response.status_code == 400 and response.json()["type"] == "error"
        assert response.json()["error"]["message"].startswith(field)
    ok = ANTHROPIC | {"metadata": {"user_id": "u"}, "thinking": {"type": "disabled"}}
    assert client.post("/v1/messages", json=ok).status_code == 200


def test_the_api_key_comes_one_way_from_a_flag_a_file_or_the_environment(tmp_path, monkeypatch):
    def args(key=None, key_file=None):
        return argparse.Namespace(api_key=key, api_key_file=key_file)

    monkeypatch.delenv("PICO_VLLM_API_KEY", raising=False)
    assert _api_key(args()) is None and _api_key(args("k1")) == "k1"
    path = tmp_path / "key"
    path.write_text("s3cret\n")
    assert _api_key(args(key_file=str(path))) == "s3cret"
    monkeypatch.setenv("PICO_VLLM_API_KEY", "from-env")
    assert _api_key(args()) == "from-env"
    with pytest.raises(ValueError, match="one way, not --api-key-file and PICO_VLLM_API_KEY"):
        _api_key(args(key_file=str(path)))
    monkeypatch.delenv("PICO_VLLM_API_KEY")
    path.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        _api_key(args(key_file=str(path)))
    with pytest.raises(ValueError, match="No such file or directory"):
        _api_key(args(key_file=str(tmp_path / "missing")))


def test_cors_is_closed_unless_an_origin_is_allowed(chat_model, client):
    preflight = {"origin": "https://example.com", "access-control-request-method": "POST"}
    closed = client.options("/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in closed.headers
    posted = client.post("/v1/chat/completions", json=CHAT, headers={"origin": "https://example.com"})
    assert "access-control-allow-origin" not in posted.headers
    engine = AsyncEngine(EngineConfig(model=str(chat_model), num_blocks=16, max_model_len=64), "open")
    try:
        with TestClient(create_app([engine], allowed_origins=["https://example.com"])) as open_client:
            answer = open_client.options("/v1/chat/completions", headers=preflight)
            assert answer.headers["access-control-allow-origin"] == "https://example.com"
            evil = preflight | {"origin": "https://evil.example"}
            other = open_client.options("/v1/chat/completions", headers=evil)
            assert "access-control-allow-origin" not in other.headers
    finally:
        engine.shutdown()


def test_one_client_has_at_most_its_share_of_requests_in_flight(chat_model, monkeypatch):
    import threading
    import time

    engine = AsyncEngine(EngineConfig(model=str(chat_model), num_blocks=32, max_model_len=128), "tiny")
    step = engine.engine.step
    monkeypatch.setattr(engine.engine, "step", lambda: (time.sleep(0.02), step())[1])  # slow steps
    body = {"prompt": "Hi", "max_tokens": 60, "ignore_eos": True, "temperature": 0}
    try:
        with TestClient(create_app([engine], max_per_client=2)) as client:
            first = threading.Thread(target=client.post, args=("/v1/completions",), kwargs={"json": body})
            first.start()
            while engine.requests_of("testclient") == 0:
                time.sleep(0.01)
            refused = client.post("/v1/completions", json=body | {"n": 2})  # 1 + 2 > 2
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["message"] == (
                "this client already has requests in flight (at most 2: --max-concurrent-per-key)")
            assert client.post("/v1/completions", json=body | {"max_tokens": 2}).status_code == 200
            assert engine.requests_of("testclient") == 1  # the first one, still running
            first.join()
            assert client.post("/v1/completions", json=body | {"n": 2, "max_tokens": 2}).status_code == 200
            assert engine.requests_of("testclient") == 0
    finally:
        engine.shutdown()
