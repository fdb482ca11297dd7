"""Architectures beyond Llama/Qwen, token for token and logprob for logprob against mlx-lm.

Random-weight models of each architecture (sliding windows shorter than the prompts, attention
sinks, softcapping, MoE, packed q|k|v, q/k norms over whole projections) run through the engine
in batches under chunked prefill, preemption, prefix caching and captured decode graphs; every
step's greedy token and top-5 logprobs must equal mlx-lm's ``generate_step`` on the prompt alone.
Gemma 2 runs on our own file; mlx-lm's ``gemma2`` ignores the checkpoint's window, so its oracle
is mlx-lm's Gemma 2 layers with the window put into their masks.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.base import create_causal_mask
from mlx_lm.utils import load as mlx_lm_load
from test_engine_parity import NEAR_TIE, Oracle, prompts_for

from pico_vllm import EngineConfig, LLMEngine, SamplingParams
from pico_vllm.models.mlx_lm_adapter import MlxLmModel

ADAPTED = ["gemma3_text", "gpt_oss", "qwen3_moe", "mixtral", "phi3", "olmo2"]
WINDOW = 24  # the windowed architectures' window (tests/model_factory.py): shorter than the prompts
MAX_TOKENS = 12
TOP = 5


class WindowedGemma2Oracle(Oracle):
    """mlx-lm's Gemma 2 with the checkpoint's window: every even layer attends to its last
    ``WINDOW`` tokens (Hugging Face's Gemma 2). Greedy, recomputing the whole sequence per token."""

    def __call__(self, prompt: list[int], max_tokens: int = MAX_TOKENS):
        key = (*prompt, -max_tokens)
        if key not in self._memo:
            tokens, logprobs = list(prompt), []
            for _ in range(max_tokens):
                logits = self.logits(tokens)[-1]
                logprobs.append(logits - mx.logsumexp(logits))
                tokens.append(int(mx.argmax(logits)))
            self._memo[key] = (tokens[len(prompt):], logprobs)
        return self._memo[key]

    def logits(self, tokens: list[int]) -> mx.array:
        model, n = self.model, len(tokens)
        h = model.model.embed_tokens(mx.array(tokens)[None]) * model.args.hidden_size**0.5
        full, windowed = create_causal_mask(n), create_causal_mask(n, window_size=WINDOW)
        for i, layer in enumerate(model.model.layers):
            h = layer(h, windowed if i % 2 == 0 else full, None)
        logits = model.model.embed_tokens.as_linear(model.model.norm(h))[0]
        cap = model.final_logit_softcapping
        return mx.tanh(logits / cap) * cap


@pytest.fixture(scope="module")
def oracles(random_model) -> dict[str, Oracle]:
    out = {arch: Oracle(random_model(arch, head_dim=32)) for arch in ADAPTED}
    out["gemma2"] = WindowedGemma2Oracle(random_model("gemma2", head_dim=32))
    return out


def check_against_oracle(outputs, prompts, oracle: Oracle, max_tokens: int = MAX_TOKENS) -> None:
    """Each step: the same greedy token (or a near-tie, after which comparing stops) and the same
    top-5 (id, logprob) pairs as mlx-lm's."""
    for out, prompt in zip(outputs, prompts):
        expected, logprobs = oracle(prompt, max_tokens)
        assert len(out.token_ids) == max_tokens
        for step, (ours, theirs) in enumerate(zip(out.token_ids, expected)):
            want = np.array(logprobs[step].astype(mx.float32))
            top = np.argsort(-want, kind="stable")[:TOP]
            got = dict(out.top_logprobs[step])
            # The top-5 values, whichever of two near-tied ids each side listed first.
            np.testing.assert_allclose(sorted(got.values(), reverse=True), want[top], atol=2e-4, rtol=1e-5)
            for token_id, value in got.items():
                assert abs(value - want[token_id]) < 2e-4, (step, token_id, value, want[token_id])
            if ours != theirs:
                gap = abs(want[ours] - want[theirs])
                assert gap < NEAR_TIE, f"step {step}: ours {ours}, mlx-lm {theirs} (gap {gap:.2e})"
                break


REGIMES = {
    # Chunks of 16 tokens, a pool too small for every sequence at once, captured decode graphs.
    "chunked + preemption + graphs": dict(num_blocks=10, max_num_batched_tokens=16),
    "eager, roomy pool": dict(num_blocks=256, enforce_eager=True),
}


@pytest.mark.parametrize("arch", ["gemma2", *ADAPTED])
def test_greedy_tokens_and_top5_logprobs_match_mlx_lm(random_model, oracles, arch):
    path = random_model(arch, head_dim=32)
    shared = prompts_for(512, [40], seed=5)[0]  # longer than the window: prefix-cache hits past it
    prompts = [shared + tail for tail in prompts_for(512, [3, 20], seed=6)]
    prompts += prompts_for(512, [5, 30, 70], seed=7)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=TOP)
    tokens = {}
    for regime, overrides in REGIMES.items():
        engine = LLMEngine(EngineConfig(model=str(path), max_num_seqs=8, **overrides))
        assert isinstance(engine.model, MlxLmModel) == (arch != "gemma2")
        outputs = engine_outputs(engine, prompts, params)
        check_against_oracle(outputs, prompts, oracles[arch])
        tokens[regime] = [o.token_ids for o in outputs]
        if regime.startswith("chunked"):
            assert engine.stats.preemptions > 0 and engine.runner.graphs.captures > 0
            assert engine.stats.cached_prompt_tokens > 0
        if arch in ("gemma2", "gemma3_text", "gpt_oss"):
            assert WINDOW in engine.model.layer_windows
    assert tokens["eager, roomy pool"] == tokens["chunked + preemption + graphs"]


def engine_outputs(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> list:
    ids = [engine.add_request(p, params) for p in prompts]
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    manager = engine.scheduler.block_manager
    manager.check_invariants()
    assert manager.num_free_blocks == manager.num_blocks
    return [final[i] for i in ids]


def test_gemma2_oracle_without_a_binding_window_is_mlx_lm_itself(random_model):
    """The windowed oracle is mlx-lm's Gemma 2 up to the window (where windows change nothing)."""
    path = random_model("gemma2", head_dim=32)
    windowed, plain = WindowedGemma2Oracle(path), Oracle(path)
    def logprobs(oracle, prompt):
        return np.stack([np.array(lp) for lp in oracle(prompt, MAX_TOKENS)[1]])

    prompt = prompts_for(512, [WINDOW - MAX_TOKENS], seed=1)[0]
    np.testing.assert_allclose(logprobs(windowed, prompt), logprobs(plain, prompt), atol=1e-4)
    longer = prompts_for(512, [3 * WINDOW], seed=1)[0]  # past it, the window matters
    assert np.abs(logprobs(windowed, longer) - logprobs(plain, longer)).max() > 0.1


def test_the_adapter_leaves_mlx_lm_generation_unchanged(random_model):
    """The adapter changes the classes of mlx-lm's modules in place: outside the engine (mlx-lm's
    own caches) they compute exactly what they did."""
    path = random_model("gpt_oss", head_dim=32)
    prompt = mx.array(prompts_for(512, [30], seed=2)[0])[None]
    untouched, _ = mlx_lm_load(str(path))
    adapted, _ = mlx_lm_load(str(path))
    MlxLmModel(adapted, "gpt_oss")
    assert type(adapted.model.layers[0].self_attn) is not type(untouched.model.layers[0].self_attn)
    assert mx.array_equal(adapted(prompt), untouched(prompt))
