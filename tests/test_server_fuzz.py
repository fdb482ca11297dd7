"""Property-based fuzzing of every route from the server's own OpenAPI schema (schemathesis):
whatever the body, no 5xx, every error in OpenAI's shape (Anthropic's on its routes), and the
server healthy and holding no block afterwards."""

from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from pico_vllm import EngineConfig
from pico_vllm.server.app import create_app
from pico_vllm.server.async_engine import AsyncEngine

EXAMPLES_PER_ROUTE = 30  # bounded: about a minute for every route together on 2 cores


@pytest.fixture(scope="module")
def served(chat_model):
    engine = AsyncEngine(EngineConfig(model=str(chat_model), num_blocks=64, max_model_len=64), "tiny")
    yield engine, create_app([engine], max_queue=64, max_request_bytes=64 * 1024)
    with TestClient(create_app([engine])) as client:  # afterwards: healthy, nothing held
        assert client.get("/health").json() == {"status": "ok"}
    manager = engine.engine.scheduler.block_manager
    assert manager.num_free_blocks == manager.num_blocks and not engine.engine.has_unfinished_requests()
    engine.shutdown()


@pytest.fixture(scope="module")
def api(served):
    return schemathesis.openapi.from_asgi("/openapi.json", served[1])


def test_no_request_makes_the_server_fail(api):
    """Every operation in turn (schemathesis's pytest plugin does not run under this pytest)."""
    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/messages"}
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_ROUTE, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        def check(case):
            response = case.call()
            assert response.status_code < 500, f"{case.method} {case.path} {case.body!r}: {response.text}"
            if response.status_code >= 400:
                body = response.json()
                if case.path.startswith("/v1/messages"):
                    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
                else:
                    assert set(body["error"]) == {"message", "type", "param", "code"}
                    assert body["error"]["code"] == response.status_code

        check()
