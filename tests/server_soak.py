"""A bounded, local soak of `pico-vllm serve`: many requests with random parameters and prompt
lengths through the official openai client, a fifth of them hanging up mid-stream, while the
server's RSS and MLX memory are sampled. Used by ``test_server_live.py``; by hand::

    uv run pico-vllm serve --port 8000 &
    uv run python tests/server_soak.py --requests 2000 --pid $! --plot soak.png

It prints the samples and the growth after warm-up (the first third of the requests), writes the
plot when asked, and exits 1 if a request failed with anything but a deliberate hang-up.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
from openai import AsyncOpenAI
from server_load import prometheus_sum

WORDS = "the a of paged attention block cache model token step batch server metal kernel".split()


@dataclass
class Sample:
    done: int  # requests finished when sampled
    seconds: float
    rss_mb: float
    mlx_active_mb: float
    mlx_cache_mb: float


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` in MB (``ps``: Linux and macOS alike)."""
    return int(subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True,
                              check=True).stdout.strip()) / 1024


async def one_request(client: AsyncOpenAI, rng: random.Random, hang_up: bool) -> None:
    """A chat or completion with random lengths and sampling; a hang-up leaves after a chunk."""
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))
    common = {"model": "soak", "max_tokens": rng.randint(1, 24), "temperature": rng.choice([0, 0.7, 1.2]),
              "top_p": rng.choice([1.0, 0.9]), "seed": rng.randint(0, 10**6), "n": rng.choice([1, 1, 2])}
    stream = hang_up or rng.random() < 0.5
    if rng.random() < 0.5:
        call = client.chat.completions.create(messages=[{"role": "user", "content": prompt}], stream=stream,
                                              **common)
    else:
        call = client.completions.create(prompt=prompt, stream=stream, logprobs=rng.choice([None, 2]),
                                         **common)
    response = await call
    if stream:
        async for _ in response:
            if hang_up:
                await response.close()
                return


async def soak(base: str, pid: int, requests: int, concurrency: int, seed: int,
               samples_every: int) -> tuple[list[Sample], int]:
    rng = random.Random(seed)
    client = AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
    samples, failures, done = [], 0, 0
    started = time.monotonic()

    async def sample() -> None:
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"{base}/metrics")).text
        samples.append(Sample(done, time.monotonic() - started, rss_mb(pid),
                              prometheus_sum(text, "pico_vllm_mlx_active_memory_bytes") / 2**20,
                              prometheus_sum(text, "pico_vllm_mlx_cache_memory_bytes") / 2**20))

    queue = list(range(requests))

    async def worker() -> None:
        nonlocal failures, done
        while queue:
            queue.pop()
            try:
                await one_request(client, rng, hang_up=rng.random() < 0.2)
            except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                failures += 1
                print(f"request failed: {type(e).__name__}: {e}", file=sys.stderr)
            done += 1
            if done % samples_every == 0:
                await sample()

    await sample()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await asyncio.sleep(1)  # the server goes idle: its MLX cache is emptied
    await sample()
    await client.close()
    return samples, failures


def growth(samples: list[Sample], field: str) -> float:
    """Relative growth of ``field`` from the end of warm-up (a third of the run) to the end."""
    warm = next(s for s in samples if s.done >= samples[-1].done / 3)
    return getattr(samples[-1], field) / getattr(warm, field) - 1


def plot(samples: list[Sample], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    done = [s.done for s in samples]
    for field, label in (("rss_mb", "RSS"), ("mlx_active_mb", "MLX active"), ("mlx_cache_mb", "MLX cache")):
        ax.plot(done, [getattr(s, field) for s in samples], marker=".", label=label)
    ax.set_xlabel("requests finished")
    ax.set_ylabel("MB")
    ax.set_title("pico-vllm serve under a soak")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="http://127.0.0.1:8000")
    parser.add_argument("--pid", type=int, required=True, help="the server's process id (for its RSS)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=None, help="write the memory plot (PNG) here")
    args = parser.parse_args()
    samples, failures = asyncio.run(soak(args.base, args.pid, args.requests, args.concurrency, args.seed,
                                         max(1, args.requests // 20)))
    for s in samples:
        print(f"{s.done:6d} requests {s.seconds:7.1f} s  RSS {s.rss_mb:7.1f} MB  MLX active "
              f"{s.mlx_active_mb:7.1f} MB  cache {s.mlx_cache_mb:7.1f} MB")
    print(f"growth after warm-up: RSS {growth(samples, 'rss_mb'):+.1%}, MLX active "
          f"{growth(samples, 'mlx_active_mb'):+.1%}; {failures} failed")
    if args.plot:
        plot(samples, args.plot)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
