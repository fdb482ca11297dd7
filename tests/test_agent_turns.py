"""An agent's conversation grows turn by turn; turn N must reuse the KV of turns 1..N-1. With the
embedded SmolLM2 through both APIs: every full block of the previous turn's tokens (its prompt,
and the reply as the model produced it) comes back from the prefix cache, as clients see it in
usage (OpenAI's ``prompt_tokens_details.cached_tokens``, Anthropic's ``cache_read_input_tokens``)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from pico_vllm import EngineConfig
from pico_vllm.server.app import create_app
from pico_vllm.server.async_engine import AsyncEngine

QUESTIONS = ["What is the capital of France?", "And what river runs through it?",
             "Name a famous museum there.", "What is a popular dish?", "Summarize our chat in one line."]
BLOCK = 16


@pytest.fixture
def client():
    """A fresh server per API: the other API's conversation would be in the cache too."""
    engine = AsyncEngine(EngineConfig(max_model_len=2048, block_size=BLOCK), "smol")
    with TestClient(create_app([engine])) as c:
        yield c
    engine.shutdown()


def turn(client, api: str, messages: list[dict]) -> tuple[str, int, int, int]:
    """One turn: (reply, prompt tokens, of which cached, completion tokens)."""
    body = {"messages": messages, "max_tokens": 48, "temperature": 0}
    if api == "openai":
        reply = client.post("/v1/chat/completions", json=body).json()
        usage = reply["usage"]
        return (reply["choices"][0]["message"]["content"], usage["prompt_tokens"],
                usage["prompt_tokens_details"]["cached_tokens"], usage["completion_tokens"])
    reply = client.post("/v1/messages", json=body | {"model": "smol"}).json()
    usage = reply["usage"]
    cached = usage["cache_read_input_tokens"]
    return reply["content"][0]["text"], usage["input_tokens"] + cached, cached, usage["output_tokens"]


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_each_turn_reuses_every_full_block_of_the_turns_before(client, api):
    messages, previous, shares = [], None, []
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        reply, prompt, cached, completion = turn(client, api, messages)
        if previous is not None:
            # The previous turn's tokens whose K/V was computed (its last sampled token's never is),
            # in whole blocks: all of them come back from the cache.
            assert cached == (previous - 1) // BLOCK * BLOCK, (api, len(messages), cached, previous)
            shares.append((cached, previous))
        previous = prompt + completion
        messages.append({"role": "assistant", "content": reply})
    total = sum(c for c, _ in shares) / sum(p for _, p in shares)
    print(f"{api}: cached / previous turn's tokens, turns 2-5: "
          + ", ".join(f"{c}/{p}" for c, p in shares) + f" (all together {total:.0%})")
    assert total >= 0.9
