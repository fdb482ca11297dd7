"""Asynchronous scheduling changes when the host learns tokens, never which tokens: everything a
request sees equals the synchronous engine's (stops, EOS mid-batch, penalties, logprobs, seeds,
aborts during a step)."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

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


def test_reading_a_step_back_waits_for_its_samples_not_for_the_next_steps_pool_writes(model, monkeypatch):
    """The pool is one list whose arrays each step replaces: by the time step n is read back it
    holds step n+1's, and evaluating them would keep the host waiting for all of step n+1."""
    from pico_vllm.engine.pending_step import PendingStep

    sync, engine = engines(model)
    real_eval, real_resolve = mx.eval, PendingStep.resolve
    resolving, evaluated_in_resolve = [False], []

    def eval_spy(*trees):
        if resolving[0]:
            evaluated_in_resolve.extend(a for _, a in tree_flatten(trees) if isinstance(a, mx.array))
        return real_eval(*trees)

    def resolve_spy(self):
        resolving[0] = True
        try:
            return real_resolve(self)
        finally:
            resolving[0] = False

    monkeypatch.setattr(mx, "eval", eval_spy)
    monkeypatch.setattr(PendingStep, "resolve", resolve_spy)
    requests = [([7, 8, 9], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)),
                ([5, 4, 3, 2], SamplingParams(temperature=0.8, seed=1, max_tokens=6, logprobs=1))]
    for prompt, params in requests:
        engine.add_request(prompt, params)
    overlapped, tokens = 0, {}
    while engine.has_unfinished_requests():
        evaluated_in_resolve.clear()
        for out in engine.step():
            tokens[out.request_id] = out.token_ids
        pool = engine.runner.cache.state
        assert not any(a is p for a in evaluated_in_resolve for p in pool)
        overlapped += bool(evaluated_in_resolve)
    assert overlapped >= 4  # steps that read a step back while the next one was queued
    monkeypatch.undo()
    assert tokens == {i: v[0] for i, v in run(sync, requests).items()}

