"""Acceptance: pico-vllm's greedy tokens equal mlx-lm's, token for token, under every scheduling
regime the engine has (batching, chunked prefill, preemption, prefix caching, block sizes)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.utils import load as mlx_lm_load

from pico_vllm import EngineConfig, LLMEngine, SamplingParams

MAX_TOKENS = 10
# Where mlx-lm's own top-2 logprobs are closer than this, a batched matmul may legitimately pick
# the other token: the test then accepts a divergence at that step (and stops comparing there).
NEAR_TIE = 1e-4


def prompts_for(vocab_size: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab_size, size=n).tolist() for n in lengths]


class Oracle:
    """mlx-lm's greedy continuation of each prompt alone, with its per-step logprobs."""

    def __init__(self, model_dir: Path) -> None:
        self.model, _ = mlx_lm_load(str(model_dir))
        self._memo: dict[tuple[int, ...], tuple[list[int], list[mx.array]]] = {}

    def __call__(self, prompt: list[int], max_tokens: int = MAX_TOKENS):
        key = (*prompt, -max_tokens)
        if key not in self._memo:
            tokens, logprobs = [], []
            for token, lp in generate_step(mx.array(prompt), self.model, max_tokens=max_tokens):
                tokens.append(int(token))
                logprobs.append(lp)
            self._memo[key] = (tokens, logprobs)
        return self._memo[key]


def assert_matches(ours: list[int], prompt: list[int], oracle: Oracle, max_tokens: int = MAX_TOKENS):
    expected, logprobs = oracle(prompt, max_tokens)
    for step, (a, b) in enumerate(zip(ours, expected)):
        if a != b:
            gap = abs(float(logprobs[step][a]) - float(logprobs[step][b]))
            assert gap < NEAR_TIE, (
                f"step {step}: pico-vllm chose {a}, mlx-lm {b} (logprob gap {gap:.2e} is no tie)\n"
                f"ours={ours}\nmlx-lm={expected}"
            )
            return
    assert len(ours) == len(expected)


def run_greedy(engine: LLMEngine, prompts: list[list[int]], max_tokens: int = MAX_TOKENS):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out.token_ids
    assert_pool_clean(engine)
    return [final[i] for i in ids]


def assert_pool_clean(engine: LLMEngine) -> None:
    """After all requests finish, every block is free or reclaimable prefix cache."""
    manager = engine.scheduler.block_manager
    manager.check_invariants()
    assert manager.num_free_blocks == manager.num_blocks


ARCHS = [
    ("llama", 64),
    ("llama", 16),
    ("qwen2", 64),
    ("qwen3", 64),
    ("qwen3", 32),
]


@pytest.fixture(scope="module")
def models(random_model) -> dict[tuple[str, int], Path]:
    return {
        # llama-16 ties its embeddings; the others have an lm_head of their own.
        (arch, hd): random_model(arch, head_dim=hd, seed=hd, tie_word_embeddings=hd == 16)
        for arch, hd in ARCHS
    }


@pytest.fixture(scope="module")
def oracles(models) -> dict[tuple[str, int], Oracle]:
    return {key: Oracle(path) for key, path in models.items()}


LENGTHS = [1, 7, 16, 17, 33, 64, 129, 200]  # 8 concurrent prompts across block boundaries


MODES = {  # the default engine, then each of its two mechanisms switched off
    "compiled + async": {},
    "eager": dict(enforce_eager=True),
    "synchronous": dict(async_scheduling=False),
}


def run_compiled_and_eager(model_dir: Path, prompts_seed: int, **overrides) -> tuple[LLMEngine, list]:
    """Greedy outputs of the default engine (captured decode graphs, asynchronous scheduling),
    checked equal token for token to the eager engine's and to the synchronous engine's."""
    outputs, engines = {}, {}
    for mode, switches in MODES.items():
        engine = LLMEngine(EngineConfig(model=str(model_dir), **switches, **overrides))
        prompts = prompts_for(engine.vocab_size, LENGTHS, seed=prompts_seed)
        outputs[mode], engines[mode] = run_greedy(engine, prompts), engine
    assert engines["compiled + async"].runner.graphs.captures > 0
    assert engines["eager"].runner.graphs is None
    for mode in ("eager", "synchronous"):
        assert outputs[mode] == outputs["compiled + async"], f"the {mode} engine diverged"
    return engines["compiled + async"], list(zip(prompts, outputs["compiled + async"]))


@pytest.mark.parametrize("arch,head_dim", ARCHS)
def test_batched_greedy_matches_mlx_lm(models, oracles, arch, head_dim):
    key = (arch, head_dim)
    _, results = run_compiled_and_eager(models[key], head_dim, num_blocks=256)
    for prompt, ours in results:
        assert_matches(ours, prompt, oracles[key])


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("chunked prefill", dict(max_num_batched_tokens=24)),
        ("preemption", dict(num_blocks=30, max_num_batched_tokens=64)),
        ("block_size 8", dict(block_size=8, num_blocks=512)),
        ("block_size 32", dict(block_size=32, num_blocks=64)),
        ("no prefix caching", dict(enable_prefix_caching=False, num_blocks=256)),
    ],
)
def test_scheduling_regimes_stay_token_exact(models, oracles, name, overrides):
    key = ("llama", 64)
    engine, results = run_compiled_and_eager(models[key], 1, **overrides)
    for prompt, ours in results:
        assert_matches(ours, prompt, oracles[key])
    if name == "preemption":
        assert engine.stats.preemptions > 0, "the pool was meant to be too small for 8 sequences"
    if name == "chunked prefill":
        assert engine.stats.steps > 200 // 24


def test_shared_prefix_hit_path_equals_miss_path(models, oracles):
    key = ("qwen3", 64)
    engine = LLMEngine(EngineConfig(model=str(models[key]), num_blocks=256))
    system = prompts_for(engine.vocab_size, [70], seed=7)[0]
    tails = prompts_for(engine.vocab_size, [1, 5, 16, 30], seed=8)
    prompts = [system + t for t in tails]

    miss = run_greedy(engine, prompts[:1])  # fills the cache with the shared prefix
    cached_before = engine.stats.cached_prompt_tokens
    hit = run_greedy(engine, prompts)  # every prompt now starts with cached blocks
    assert engine.stats.cached_prompt_tokens - cached_before >= len(prompts) * (70 // 16) * 16
    assert hit[0] == miss[0]
    for prompt, ours in zip(prompts, hit):
        assert_matches(ours, prompt, oracles[key])


def test_identical_prompts_fully_cached_still_generate(models, oracles):
    """A prompt whose every block is cached still recomputes its last token to get logits."""
    key = ("llama", 64)
    engine = LLMEngine(EngineConfig(model=str(models[key]), num_blocks=128))
    prompt = prompts_for(engine.vocab_size, [48], seed=3)[0]  # exactly 3 full blocks
    first = run_greedy(engine, [prompt])
    again = run_greedy(engine, [prompt, prompt])
    assert again == [first[0], first[0]]
    assert_matches(first[0], prompt, oracles[key])


def test_quantized_checkpoint_runs_dequantized_on_cpu_and_matches(tmp_path):
    """An mlx-community style 4-bit folder loads unchanged; on the CPU it is dequantized to fp32
    and still follows mlx-lm (which runs the quantized matmuls) token for token."""
    import shutil

    from mlx_lm.utils import load_model, quantize_model, save_config, save_model
    from model_factory import make_random_model

    source = make_random_model(tmp_path / "fp32", "qwen2", head_dim=64, seed=11)
    model, config = load_model(source)
    model, config = quantize_model(model, config, group_size=64, bits=4)
    target = tmp_path / "4bit"
    save_model(target, model)
    save_config(config, target / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, target / name)

    engine = LLMEngine(EngineConfig(model=str(target), num_blocks=128))
    assert engine.model.model.layers[0].self_attn.q_proj.weight.dtype == mx.float32
    assert "QuantizedLinear" not in str(engine.model)
    prompts = prompts_for(engine.vocab_size, [5, 40, 100], seed=4)
    oracle = Oracle(target)
    for prompt, ours in zip(prompts, run_greedy(engine, prompts)):
        assert_matches(ours, prompt, oracle)
