"""Speculative decoding with a draft model (``{"model": ..., "num_speculative_tokens": k}``):
the draft's greedy guesses, batched over the drafting sequences, are verified like any drafts,
so outputs equal the engine without speculation token for token, whatever the draft."""

from __future__ import annotations

import pytest

from pico_vllm import EngineConfig, LLMEngine, SamplingParams
from tests.test_speculative import looping_prompts, run, same_outputs

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def model(random_model):
    return str(random_model("llama", head_dim=32, seed=5))


@pytest.fixture(scope="module")
def other_draft(random_model):
    """A smaller random model with the same tokenizer: its guesses are almost always wrong."""
    return str(random_model("llama", head_dim=32, num_hidden_layers=1, seed=9))


def draft_config(draft: str, k: int = 4) -> dict:
    return {"model": draft, "num_speculative_tokens": k}


REGIMES = {
    "default": {},
    "chunked prefill": {"max_num_batched_tokens": 16},
    "preemption": {"num_blocks": 20},
    "no prefix cache": {"enable_prefix_caching": False},
}


@pytest.mark.parametrize("regime", REGIMES)
def test_the_target_as_its_own_draft_keeps_almost_every_draft_and_changes_no_token(model, regime):
    config = dict(model=model, num_blocks=96, block_size=8) | REGIMES[regime]
    requests = [(p, GREEDY) for p in looping_prompts(seed=6)]
    plain = run(LLMEngine(EngineConfig(**config)), requests)
    engine = LLMEngine(EngineConfig(**config, speculative_config=draft_config(model)))
    same_outputs(plain, run(engine, requests))
    stats = engine.stats
    assert stats.draft_tokens > 60 and stats.accepted_draft_tokens >= 0.9 * stats.draft_tokens
    if regime == "preemption":
        assert stats.preemptions > 0


def test_a_poor_draft_changes_no_token_of_seeded_sampling_with_penalties(model, other_draft):
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=24, presence_penalty=0.5, logprobs=2)
              for i in range(5)]
    requests = list(zip(looping_prompts(seed=7), params))
    plain = run(LLMEngine(EngineConfig(model=model, num_blocks=96, block_size=8)), requests)
    engine = LLMEngine(EngineConfig(model=model, num_blocks=96, block_size=8,
                                    speculative_config=draft_config(other_draft, k=3)))
    same_outputs(plain, run(engine, requests))
    assert engine.stats.draft_tokens > engine.stats.accepted_draft_tokens


def test_a_draft_model_that_cannot_serve_the_target_is_refused(model, random_model):
    gemma = str(random_model("gemma3_text", head_dim=32, seed=2))
    with pytest.raises(ValueError, match="no sliding windows"):
        LLMEngine(EngineConfig(model=gemma, num_blocks=32, speculative_config=draft_config(model)))
    with pytest.raises(ValueError, match="has another vocabulary than the target"):
        LLMEngine(EngineConfig(model=None, num_blocks=32, speculative_config=draft_config(model)))
    with pytest.raises(FileNotFoundError, match="model path does not exist"):
        LLMEngine(EngineConfig(model=model, num_blocks=32, speculative_config=draft_config("./no-draft")))
