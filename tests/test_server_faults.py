"""The server stays up: an exception inside a step fails the requests of that step (500, or an
error chunk in a stream), frees their blocks and leaves the engine serving; an engine thread
that dies turns /health and every request to 503 and makes the server exit 1; a port already
taken is one line and exit 2."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import uvicorn
from fastapi.testclient import TestClient

from pico_vllm import EngineConfig
from pico_vllm.engine import detokenizer
from pico_vllm.server import async_engine
from pico_vllm.server.app import create_app
from pico_vllm.server.async_engine import AsyncEngine
from pico_vllm.server.drain import DrainingServer

BODY = {"prompt": "Hi", "max_tokens": 6, "temperature": 0, "ignore_eos": True}


@pytest.fixture
def engine(chat_model):
    served = AsyncEngine(EngineConfig(model=str(chat_model), num_blocks=32, max_model_len=128), "tiny")
    yield served
    served.shutdown()


class Fault:
    """Wraps a callable so that it raises while armed: the test-only way into a step."""

    def __init__(self, target):
        self.target, self.armed = target, False

    def __call__(self, *args, **kwargs):
        if self.armed:
            raise RuntimeError("injected fault")
        return self.target(*args, **kwargs)


def inject(where: str, engine: AsyncEngine, monkeypatch) -> Fault:
    if where == "model":
        fault = Fault(engine.engine.runner.model)
        monkeypatch.setattr(engine.engine.runner, "model", fault)
    elif where == "sampler":
        fault = Fault(engine.engine.runner.sampler.sample)
        monkeypatch.setattr(engine.engine.runner.sampler, "sample", fault)
    else:
        fault = Fault(detokenizer.IncrementalDetokenizer.add_token)
        monkeypatch.setattr(detokenizer.IncrementalDetokenizer, "add_token",
                            lambda self, token: fault(self, token))
    return fault


@pytest.mark.parametrize("where", ["model", "sampler", "detokenizer"])
def test_a_step_that_raises_fails_its_requests_and_the_engine_serves_on(engine, monkeypatch, where):
    body = BODY | ({"temperature": 1.0, "seed": 3} if where == "sampler" else {})  # greedy skips it
    with TestClient(create_app([engine])) as client:
        expected = client.post("/v1/completions", json=body).json()["choices"]
        fault = inject(where, engine, monkeypatch)
        fault.armed = True
        failed = client.post("/v1/completions", json=body)
        assert failed.status_code == 500, failed.text
        assert failed.json()["error"] == {"message": "engine error: RuntimeError: injected fault",
                                          "type": "server_error", "param": None, "code": 500}
        with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as response:
            lines = [line for line in response.iter_lines() if line]
        assert response.status_code in (200, 500)  # the fault may come before the first token
        if response.status_code == 200:
            assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == 500
            assert lines[-1] == "data: [DONE]"
        fault.armed = False
        assert client.get("/health").json() == {"status": "ok"}
        assert client.post("/v1/completions", json=body).json()["choices"] == expected
    manager = engine.engine.scheduler.block_manager
    manager.check_invariants()
    assert manager.num_free_blocks == manager.num_blocks and not engine.engine.has_unfinished_requests()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the traceback it logs
def test_a_dead_engine_thread_answers_503_everywhere_and_the_server_exits_1(engine, monkeypatch):
    def broken(engine_, command):
        raise RuntimeError("the loop broke")

    monkeypatch.setattr(async_engine, "apply_command", broken)  # outside any step: the thread dies
    app = create_app([engine])
    with TestClient(app) as client:
        first = client.post("/v1/completions", json=BODY)
        assert first.status_code == 503, first.text
        why = "the engine of model 'tiny' has stopped: RuntimeError: the loop broke"
        assert first.json()["error"]["message"] == why
        chat = {"messages": [{"role": "user", "content": "x"}]}
        for response in (client.get("/health"), client.post("/v1/completions", json=BODY),
                         client.post("/v1/chat/completions", json=chat)):
            assert response.status_code == 503 and response.json()["error"]["message"] == why
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = DrainingServer(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"), app,
                            [engine], timeout=5)
    server.run()  # returns by itself: the dead engine stops it
    assert server.exit_code == 1


def test_serve_on_a_port_already_taken_exits_2_with_one_line_before_loading(chat_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "pico_vllm.cli", "serve", "--model", str(chat_model),
                                 "--port", str(port)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"pico-vllm: error: cannot listen on 127.0.0.1:{port}: Address already in use\n"


def test_serve_with_a_model_that_fails_to_load_exits_2_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pico_vllm.cli", "serve", "--model", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1] == f"pico-vllm: error: no config.json in model folder {tmp_path}"


def test_a_row_of_nan_logits_fails_its_request_and_the_batch_goes_on(chat_model, monkeypatch):
    """One request's logits turn NaN (a test-only wrapper around the model): it finishes with
    "error" and says why, the others in the same steps finish as they would alone."""
    import mlx.core as mx
    import numpy as np

    from pico_vllm import LLMEngine, SamplingParams

    engine = LLMEngine(EngineConfig(model=str(chat_model), num_blocks=32, max_model_len=128))
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = {}
    for prompt in ([5, 6, 7], [8, 9]):
        engine.add_request(prompt, greedy, request_id=str(prompt))
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                expected[out.request_id] = out.token_ids
    model, calls = engine.runner.model, []

    def poisoned(input_ids, positions, cache, meta, logit_rows=None):
        logits = model(input_ids, positions, cache, meta, logit_rows)
        calls.append(1)
        if len(calls) == 3:  # the third step: NaN in the first row (request [5, 6, 7], a decode)
            logits = mx.where(mx.array(np.arange(logits.shape[0]) == 0)[:, None], mx.nan, logits)
        return logits

    monkeypatch.setattr(engine.runner, "model", poisoned)
    monkeypatch.setattr(engine.runner, "graphs", None)  # eager, so the wrapper sees every step
    for prompt in ([5, 6, 7], [8, 9]):
        engine.add_request(prompt, greedy, request_id=f"again {prompt}")
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    failed, fine = finals["again [5, 6, 7]"], finals["again [8, 9]"]
    assert failed.finish_reason == "error" and failed.token_ids == expected["[5, 6, 7]"][:2]
    assert failed.error == "the model's logits were not numbers (NaN or inf) at output token 3"
    assert fine.finish_reason == "length" and fine.token_ids == expected["[8, 9]"]
    manager = engine.scheduler.block_manager
    assert manager.num_free_blocks == manager.num_blocks


def test_a_kv_budget_the_weights_leave_no_room_for_is_one_clear_error(chat_model):
    from pico_vllm.engine.memory import METAL_KV_FRACTION, metal_kv_budget

    assert metal_kv_budget(10 * 2**30, 4 * 2**30) == int(6 * 2**30 * METAL_KV_FRACTION)
    with pytest.raises(ValueError, match=r"weights \(12.0 GiB\) leave no room for a KV cache in this "
                                         r"Mac's GPU working set \(10.7 GiB\).*--kv-cache-bytes"):
        metal_kv_budget(int(10.7 * 2**30), 12 * 2**30)
    with pytest.raises(ValueError, match=r"KV memory budget of 100 bytes holds no block of this model "
                                         r"\(\d+ bytes\): raise --kv-cache-bytes or give --num-blocks"):
        from pico_vllm import LLMEngine

        LLMEngine(EngineConfig(model=str(chat_model), kv_cache_bytes=100))
