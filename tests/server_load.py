"""A bounded, local load test for `pico-vllm serve`: many concurrent streams, some of which hang up.

Used by ``test_server_live.py``, and runnable by hand against any server on 127.0.0.1 for the
figures (requests/s, TTFT percentiles)::

    uv run pico-vllm serve &                              # the embedded model
    uv run python tests/server_load.py --streams 200 --max-tokens 32
    uv run python tests/server_load.py --model a --api-key sekrit     # a keyed, multi-model server

It exits 1 when any stream got an error other than 429 (a wrong key's 401, say), after saying so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from pico_vllm.bench import percentile

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "Hello, my name is",
           "In 1969, the first", "A list of fruits:", "The best way to learn", "Water boils at"]


@dataclass
class StreamResult:
    index: int
    prompt: str
    status: int
    leaves_early: bool  # this client hangs up after its first few chunks, by design
    text: str = ""
    finish_reasons: list[str] = field(default_factory=list)
    completion_tokens: int | None = None
    done: bool = False  # saw `data: [DONE]`
    ttft: float | None = None
    seconds: float = 0.0
    retry_after: str | None = None


async def one_stream(client: httpx.AsyncClient, index: int, leaves_early: bool, max_tokens: int,
                     model: str | None) -> StreamResult:
    """One completion stream of ``PROMPTS[index % 8]``, read to its end or left after two chunks."""
    prompt = PROMPTS[index % len(PROMPTS)]
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    started = time.monotonic()
    async with client.stream("POST", "/v1/completions", json=body) as response:
        result = StreamResult(index, prompt, response.status_code, leaves_early)
        if response.status_code != 200:
            result.retry_after = response.headers.get("retry-after")
            await response.aread()
            return result
        chunks = 0
        async for line in response.aiter_lines():
            if not line:
                continue
            if line == "data: [DONE]":
                result.done = True
                break
            chunk = json.loads(line.removeprefix("data: "))
            if chunk.get("usage"):
                result.completion_tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if result.ttft is None and choice["text"]:
                    result.ttft = time.monotonic() - started
                result.text += choice["text"]
                if choice["finish_reason"]:
                    result.finish_reasons.append(choice["finish_reason"])
            chunks += 1
            if leaves_early and chunks == 2:
                break  # leaving the `async with` closes the connection mid-stream
    result.seconds = time.monotonic() - started
    return result


async def run_load(base: str, streams: int, leave_every: int | None = 5, max_tokens: int = 32,
                   model: str | None = None, headers: dict | None = None,
                   leaving_tokens: int | None = None) -> tuple[list[StreamResult], float]:
    """``streams`` concurrent completion streams; every ``leave_every``-th (none if None) hangs up
    after two chunks (and asks for ``leaving_tokens``, by default 4x the tokens, so that it surely
    is mid-stream). Returns the results and the wall time."""
    limits = httpx.Limits(max_connections=streams, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=120, headers=headers) as client:
        started = time.monotonic()
        leaves = [leave_every is not None and i % leave_every == 0 for i in range(streams)]
        results = await asyncio.gather(*(
            one_stream(client, i, leave, (leaving_tokens or 4 * max_tokens) if leave else max_tokens, model)
            for i, leave in enumerate(leaves)))
        return list(results), time.monotonic() - started


def prometheus_sum(text: str, name: str) -> float:
    """The sum of every sample of metric ``name`` (all label sets) in ``/metrics`` text."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def failures(results: list[StreamResult]) -> Counter:
    """How many streams got each status other than 200 and 429 (a wrong key's 401, a 400 ...)."""
    return Counter(r.status for r in results if r.status not in (200, 429))


def summary(results: list[StreamResult], seconds: float) -> str:
    completed = [r for r in results if r.status == 200 and not r.leaves_early]
    ttfts = [r.ttft for r in results if r.ttft is not None]
    hung_up = sum(r.leaves_early and r.status == 200 for r in results)
    rejected = sum(r.status == 429 for r in results)
    failed = ", ".join(f"{n} got {status}" for status, n in sorted(failures(results).items()))
    return (f"{len(results)} streams in {seconds:.1f} s: {len(completed)} completed, "
            f"{hung_up} hung up, {rejected} got 429{', ' + failed if failed else ''}; "
            f"{len(completed) / seconds:.1f} completed requests/s; TTFT p50 {percentile(ttfts, 50):.2f} s, "
            f"p99 {percentile(ttfts, 99):.2f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="http://127.0.0.1:8000")
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--model", default=None, help="served model name (needed when several are served)")
    parser.add_argument("--api-key", default=None, help="the server's --api-key")
    args = parser.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    results, seconds = asyncio.run(run_load(args.base, args.streams, max_tokens=args.max_tokens,
                                            model=args.model, headers=headers))
    print(summary(results, seconds))
    sys.exit(1 if failures(results) else 0)  # e.g. every stream 401: not a load figure
