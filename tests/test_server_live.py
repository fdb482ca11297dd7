"""`pico-vllm serve` as a real process on 127.0.0.1: the official `openai` client, two models
behind an API key, 200 streams of which a fifth hang up, overload past `--max-queue`, and a
SIGTERM that lets requests in flight finish (or aborts them when time is up) and exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest
from openai import BadRequestError, NotFoundError, OpenAI
from server_load import PROMPTS, prometheus_sum, run_load, summary
from server_soak import growth, plot, soak

KEY = {"Authorization": "Bearer sekrit"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(model: str, *flags: str, launcher: tuple[str, ...] = (),
                   env: dict | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    """`pico-vllm serve --model MODEL FLAGS` on a free port (under ``launcher``, e.g. mlx.launch),
    once `/health` answers; its whole process group is killed on the way out whatever happened
    (the test stops it first when it checks the exit)."""
    port = free_port()
    process = subprocess.Popen(
        [*launcher, sys.executable, "-m", "pico_vllm.cli", "serve", "--model", model, "--port", str(port),
         *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(base, lambda: process.poll() is None, lambda: process.stderr.read())
        yield process, base
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def wait_for_health(base: str, alive: Callable[[], bool], why: Callable[[], str],
                    timeout: float = 60) -> None:
    """Until ``base``/health answers 200; fails (saying ``why()``) if the server dies or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert alive() and time.monotonic() < deadline, why()
        time.sleep(0.2)


def stop(process: subprocess.Popen, sig: signal.Signals) -> None:
    """Send ``sig`` and require a clean exit: status 0, no traceback."""
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 0 and "Traceback" not in err, err


def metric(base: str, name: str) -> float:
    return prometheus_sum(httpx.get(f"{base}/metrics").text, name)


def wait_until_idle(base: str, timeout: float = 10) -> None:
    """Nothing in flight, running or waiting, and no KV block held (cached blocks aside)."""
    names = ("pico_vllm_requests_in_flight", "pico_vllm_requests_running", "pico_vllm_requests_waiting",
             "pico_vllm_kv_blocks_used")
    deadline = time.monotonic() + timeout
    while any(metric(base, name) for name in names) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert {name: metric(base, name) for name in names} == dict.fromkeys(names, 0)


@pytest.fixture(scope="module")
def live_server(chat_model):
    """Models "a" and "b" (the same weights), API key "sekrit", a queue of 8 per model and a
    small pool (preemption under load). On teardown a SIGINT must stop it cleanly."""
    with running_server(str(chat_model), "--model", str(chat_model), "--served-model-name", "a",
                        "--served-model-name", "b", "--api-key", "sekrit", "--max-queue", "8",
                        "--num-blocks", "32", "--max-model-len", "128") as (process, base):
        yield base
        stop(process, signal.SIGINT)


def test_the_live_server_routes_two_models_by_name_behind_its_key(live_server):
    key = {"Authorization": "Bearer sekrit"}
    assert httpx.get(f"{live_server}/v1/models").status_code == 401
    assert [m["id"] for m in httpx.get(f"{live_server}/v1/models", headers=key).json()["data"]] == ["a", "b"]
    body = {"model": "b", "prompt": [5, 6, 7], "max_tokens": 3, "ignore_eos": True}
    answer = httpx.post(f"{live_server}/v1/completions", json=body, headers=key, timeout=30).json()
    assert answer["model"] == "b" and answer["usage"]["completion_tokens"] == 3


def test_the_official_openai_client(live_server):
    client = OpenAI(base_url=f"{live_server}/v1", api_key="sekrit", max_retries=0, timeout=30)
    common = dict(model="a", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(prompt="Hello", **common)
    stream = client.completions.create(prompt="Hello", stream=True,
                                       stream_options={"include_usage": True}, **common)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 6

    messages = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(messages=messages, n=3, seed=1, **common | {"temperature": 1.0})
    assert [c.index for c in chat.choices] == [0, 1, 2] and chat.usage.completion_tokens == 18
    streamed = client.chat.completions.create(messages=messages, stream=True, **common)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == client.chat.completions.create(messages=messages, **common).choices[0].message.content

    stop = client.completions.create(prompt="Hello", stop=[whole.choices[0].text[2:4]], **common)
    assert stop.choices[0].finish_reason == "stop"
    for bad in (dict(max_tokens=-1), dict(top_p=2), dict(logprobs=50), dict(prompt=[10**6]),
                dict(prompt=""), dict(prompt=[1] * 200)):
        with pytest.raises(BadRequestError):
            client.completions.create(**(dict(model="a", prompt="Hi") | bad))
    with pytest.raises(NotFoundError):
        client.completions.create(model="nope", prompt="Hi")
    assert client.completions.create(model="a", prompt="Hi", max_tokens=2).choices[0].text is not None


def test_overload_beyond_max_queue_gets_429_and_the_rest_complete(live_server):
    # 24 long streams at once against a queue of 8: the first 8 are admitted and the pool (32
    # blocks) preempts among them; the others are answered 429 at once, never an error or a hang.
    results, _ = asyncio.run(run_load(live_server, 24, leave_every=None, max_tokens=100, model="a",
                                      headers=KEY))
    rejected = [r for r in results if r.status == 429]
    served = [r for r in results if r.status == 200]
    assert len(rejected) + len(served) == 24 and len(served) >= 8 and rejected
    assert all(r.retry_after == "1" for r in rejected)
    assert all(r.done and r.finish_reasons == ["length"] and r.completion_tokens == 100 for r in served)
    assert metric(live_server, 'pico_vllm_rejected_requests_total{reason="queue_full"}') == len(rejected)
    wait_until_idle(live_server)


@pytest.fixture(scope="module")
def load_server(chat_model):
    with running_server(str(chat_model), "--num-blocks", "512", "--max-model-len", "1024") as (process, base):
        yield base
        stop(process, signal.SIGTERM)


def test_200_streams_with_a_fifth_hanging_up_mid_stream(load_server):
    body = {"max_tokens": 32, "temperature": 0, "ignore_eos": True}
    expected = {p: httpx.post(f"{load_server}/v1/completions", json=body | {"prompt": p}, timeout=30)
                .json()["choices"][0]["text"] for p in PROMPTS}
    # The 40 that hang up ask for 768 tokens: a tiny model makes 128 in about a second under this
    # load, which a busy event loop sometimes took to notice the hang-up (they then finished).
    results, seconds = asyncio.run(run_load(load_server, 200, leave_every=5, max_tokens=32,
                                            leaving_tokens=768))
    print(summary(results, seconds))
    assert all(r.status == 200 for r in results)
    completed = [r for r in results if not r.leaves_early]
    assert len(completed) == 160
    for r in completed:  # whole and correct: the same greedy text as alone, one finish, usage
        assert (r.text, r.finish_reasons, r.completion_tokens, r.done) == (expected[r.prompt], ["length"], 32,
                                                                            True)
    wait_until_idle(load_server)
    # Only the 8 + 160 requests ran to their end: the 40 that hung up (768 tokens each) were aborted.
    assert metric(load_server, "pico_vllm_requests_total") == 168
    started = time.monotonic()
    answer = httpx.post(f"{load_server}/v1/completions", json=body | {"prompt": "Hi"}, timeout=5)
    assert answer.status_code == 200 and time.monotonic() - started < 5


def test_a_non_streaming_request_whose_client_leaves_is_aborted(load_server):
    body = {"prompt": "Hi", "max_tokens": 1000, "ignore_eos": True, "n": 4}  # seconds of work
    before = metric(load_server, "pico_vllm_requests_total")
    with pytest.raises(httpx.TimeoutException):  # the client gives up after 0.3 s
        httpx.post(f"{load_server}/v1/completions", json=body, timeout=0.3)
    wait_until_idle(load_server)
    assert metric(load_server, "pico_vllm_requests_total") == before, "the choices ran to their end"


def test_sigterm_drains_requests_in_flight_then_aborts_the_rest_and_exits_0(chat_model):
    # A short stream (100 tokens) finishes within the 2 s drain; a long one (16 choices of 1,000
    # tokens; 4 once finished within the drain here) is aborted when the drain time is up, and
    # still ends properly.
    # Meanwhile new requests get 503 and /health answers.
    async def scenario(process: subprocess.Popen, base: str) -> tuple[list, list]:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            first_chunks = [asyncio.Event(), asyncio.Event()]

            async def stream(index: int, max_tokens: int, n: int) -> list:
                body = {"prompt": "Hi", "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "n": n}
                chunks = []
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        if line:
                            chunks.append(line)
                            first_chunks[index].set()
                return chunks

            short, long = (asyncio.create_task(stream(0, 100, 1)), asyncio.create_task(stream(1, 1000, 16)))
            for event in first_chunks:
                await event.wait()
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)  # the server looks at the signal every 0.1 s
            refused = await client.post("/v1/completions", json={"prompt": "Hi"})
            assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
            assert (await client.get("/health")).status_code == 200
            return await short, await long

    with running_server(str(chat_model), "--num-blocks", "1100", "--max-model-len", "1024",
                        "--shutdown-timeout", "2") as (process, base):
        short, long = asyncio.run(scenario(process, base))
        _, err = process.communicate(timeout=60)
        assert process.returncode == 0 and "Traceback" not in err, err
        # One line says what the drain waits for and how to skip it (1 + 16 choices in flight).
        assert "draining 17 request(s) in flight for up to 2 s" in err and "signal again" in err
    for chunks, reason, n in ((short, "length", 1), (long, "abort", 16)):
        assert chunks[-1] == "data: [DONE]"
        finishes = [c for c in chunks[:-1] if '"finish_reason": null' not in c]
        assert len(finishes) == n and all(f'"finish_reason": "{reason}"' in c for c in finishes)


def test_a_soak_of_2000_requests_a_fifth_hanging_up_leaves_memory_flat(chat_model, tmp_path):
    """Random parameters and prompt lengths through the openai client, 16 at a time: after the
    warm-up (a third of the run) RSS and MLX's active memory grow under 5%, nothing fails but the
    deliberate hang-ups, and the server ends idle with its MLX cache emptied (~20 s here)."""
    with running_server(str(chat_model), "--served-model-name", "soak", "--max-model-len", "512",
                        "--num-blocks", "256") as (process, base):
        samples, failures = asyncio.run(soak(base, process.pid, requests=2000, concurrency=16, seed=0,
                                             samples_every=100))
        wait_until_idle(base)
        stop(process, signal.SIGINT)
    assert failures == 0 and samples[-1].done == 2000
    assert growth(samples, "rss_mb") < 0.05 and growth(samples, "mlx_active_mb") < 0.05, samples
    assert samples[-1].mlx_cache_mb == 0  # idle: the buffer cache was given back
    plot(samples, str(tmp_path / "soak.png"))
    assert (tmp_path / "soak.png").stat().st_size > 0


def test_slow_and_silent_clients_are_cut_off_without_holding_up_others(chat_model):
    """Slowloris: 30 connections that send nothing, half a head, or a head and part of a body,
    and one that trickles its head a byte at a time; meanwhile a plain request and a stream slower
    than the timeout are served whole, and after --request-read-timeout (1 s) the server has
    closed every held connection."""

    def closed_by_server(s: socket.socket) -> bool:
        s.settimeout(0)
        try:
            return s.recv(1) == b""
        except BlockingIOError:
            return False  # still open: nothing to read
        except ConnectionResetError:
            return True

    with running_server(str(chat_model), "--request-read-timeout", "1", "--num-blocks", "256",
                        "--max-model-len", "1024") as (process, base):
        port = int(base.rsplit(":", 1)[1])
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        partials = [b"", head, head + b"Content-Length: 100\r\n\r\n{\"prompt\": "]
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(30)]
        for i, s in enumerate(held):
            s.sendall(partials[i % 3])
        body = {"prompt": "Hi", "max_tokens": 4, "ignore_eos": True}
        answer = httpx.post(f"{base}/v1/completions", json=body, timeout=5)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4
        with httpx.Client(base_url=base, timeout=30) as client:  # a response slower than the timeout
            long = {"prompt": "Hi", "max_tokens": 1000, "ignore_eos": True, "stream": True, "n": 4}
            streamed = time.monotonic()
            with client.stream("POST", "/v1/completions", json=long) as response:
                lines = [line for line in response.iter_lines() if line]
            assert lines[-1] == "data: [DONE]" and time.monotonic() - streamed > 1.5
            # the same keep-alive connection serves its next request
            assert client.post("/v1/completions", json=body).status_code == 200
        assert all(closed_by_server(s) for s in held)

        trickle, opened = socket.create_connection(("127.0.0.1", port)), time.monotonic()
        for i in range(len(head)):  # a valid head, a byte every 0.1 s (8 s in all), does not keep it open
            if closed_by_server(trickle):
                break
            with contextlib.suppress(OSError):
                trickle.send(head[i:i + 1])
            time.sleep(0.1)
        assert closed_by_server(trickle) and time.monotonic() - opened < 2.5, "the trickle outlived its time"
        for s in [*held, trickle]:
            s.close()
        stop(process, signal.SIGTERM)
