"""Asynchronous scheduling changes when the host learns tokens, never which tokens: everything a
request sees equals the synchronous engine's (stops, EOS mid-batch, penalties, logprobs, seeds,
aborts during a step)."""

from __future__ import annotations

import pytest

from pico_vllm import EngineConfig, LLMEngine, SamplingParams


def run(engine: LLMEngine, requests) -> dict[str, tuple]:
    ids = [engine.add_request(prompt, params) for prompt, params in requests]
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert -1 not in out.token_ids, "a placeholder leaked into an output"
            if out.finished:
                final[out.request_id] = (out.token_ids, out.text, out.finish_reason, out.logprobs)
    manager = engine.scheduler.block_manager
    manager.check_invariants()
    assert manager.num_free_blocks == manager.num_blocks
    return {i: final[i] for i in ids}


@pytest.fixture(scope="module")
def model(random_model):
    return str(random_model("llama", head_dim=32, seed=5))


def engines(model, **overrides) -> tuple[LLMEngine, LLMEngine]:
    return tuple(
        LLMEngine(EngineConfig(model=model, num_blocks=64, async_scheduling=a, **overrides))
        for a in (False, True)
    )


def test_async_equals_sync_with_stops_eos_penalties_logprobs_and_seeds(model):
    sync, async_ = engines(model)
    probe = run(sync, [([7, 8, 9], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))])
    tokens, text, _, _ = probe["0"]
    stop_token, eos_token, stop_text = tokens[4], tokens[7], text[3:5]
    for engine in (sync, async_):
        engine.eos_token_ids.add(eos_token)  # an EOS the model reaches mid-batch
    greedy = dict(temperature=0, max_tokens=12)
    requests = [
        ([7, 8, 9], SamplingParams(**greedy, stop_token_ids=[stop_token])),
        ([7, 8, 9], SamplingParams(**greedy)),  # stops at the EOS
        ([7, 8, 9], SamplingParams(**greedy, stop=[stop_text], ignore_eos=True)),
        ([7, 8, 9], SamplingParams(**greedy, ignore_eos=True, logprobs=2)),
        ([1, 2, 3, 4, 5], SamplingParams(temperature=0.9, seed=3, max_tokens=9, ignore_eos=True)),
        ([5, 4, 3], SamplingParams(temperature=0, repetition_penalty=1.5, max_tokens=9, ignore_eos=True)),
        ([9] * 20, SamplingParams(**greedy, ignore_eos=True, min_tokens=3)),
    ]
    expected, got = run(sync, requests), run(async_, requests)
    reasons = [v[2] for v in expected.values()]
    assert reasons[:3] == ["stop", "stop", "stop"] and reasons[3] == "length"
    assert list(got.values()) == list(expected.values())


def test_abort_while_its_step_is_in_flight(model):
    sync, async_ = engines(model)
    requests = [([3 + i, 4, 5], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
                for i in range(3)]
    expected = run(sync, [requests[0], requests[2]])
    ids = [async_.add_request(p, s) for p, s in requests]
    seen = {i: [] for i in ids}
    for _ in range(3):
        for out in async_.step():
            seen[out.request_id].append(out)
    assert async_.abort_request(ids[1])  # its next token is being computed right now
    while async_.has_unfinished_requests():
        for out in async_.step():
            assert out.request_id != ids[1], "an aborted request produced output"
            seen[out.request_id].append(out)
    assert [seen[i][-1].token_ids for i in (ids[0], ids[2])] == [v[0] for v in expected.values()]
    manager = async_.scheduler.block_manager
    manager.check_invariants()
    assert manager.num_free_blocks == manager.num_blocks
