"""Hybrid models (issue 19): linear layers with recurrent state (gated delta nets, short
convolutions, Mamba-2) beside paged attention layers, token for token and logprob for logprob
against mlx-lm.

Random-weight models of each family, built with mlx-lm's own classes, run in batches larger than
``max_num_seqs`` (sequences wait, finish and hand their state slot on), with prompts of one token
(a state started on a decode row) and prompts chunked across steps (a state carried from chunk to
chunk), under captured decode graphs and async scheduling, then eager and synchronous, then a
pool small enough to preempt."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from model_factory import HYBRID_EXTRAS
from test_architectures import check_against_oracle
from test_engine_parity import Oracle, assert_pool_clean, prompts_for

from pico_vllm import EngineConfig, LLMEngine, SamplingParams
from pico_vllm.layers.state_pool import StateArray

HYBRIDS = sorted(HYBRID_EXTRAS)
LENGTHS = [1, 5, 23, 40, 1, 2]  # 3 at a time; one-token prompts, the second in a used slot; chunks
MAX_TOKENS = 8
SMALL = dict(max_num_seqs=3, max_num_batched_tokens=16, num_blocks=64)


@pytest.fixture(scope="module")
def hybrid(random_model):
    return lambda arch: random_model(arch, head_dim=16, num_hidden_layers=4, intermediate_size=128)


@pytest.fixture(scope="module")
def oracles(hybrid) -> dict[str, Oracle]:
    return {arch: Oracle(hybrid(arch)) for arch in HYBRIDS}


def run(engine: LLMEngine, prompts: list[list[int]], max_tokens: int = MAX_TOKENS) -> list:
    """Every request to the end; at every step, no two running sequences share a state slot."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=5)
    ids = [engine.add_request(p, params) for p in prompts]
    final = {}
    while engine.has_unfinished_requests():
        final |= {o.request_id: o for o in engine.step() if o.finished}
        slots = [seq.state_slot for seq in engine.scheduler.running]
        assert None not in slots and len(set(slots)) == len(slots), slots
    assert_pool_clean(engine)
    assert engine.scheduler.num_free_state_slots == engine.config.max_num_seqs
    return [final[i] for i in ids]


@pytest.mark.parametrize("arch", HYBRIDS)
def test_hybrid_greedy_tokens_and_logprobs_match_mlx_lm(hybrid, oracles, arch):
    engine = LLMEngine(EngineConfig(model=str(hybrid(arch)), **SMALL))
    assert engine.model.state_spec is not None
    prompts = prompts_for(engine.vocab_size, LENGTHS, seed=1)
    outputs = run(engine, prompts)
    check_against_oracle(outputs, prompts, oracles[arch], MAX_TOKENS)
    assert engine.runner.graphs.captures > 0, "decode steps ran through captured graphs"
    assert engine.stats.steps > 40 // 16, "the long prompt was chunked"


@pytest.mark.parametrize("arch", ["qwen3_next", "granitemoehybrid"])
def test_hybrid_is_the_same_eager_synchronous_and_preempted(hybrid, oracles, arch):
    prompts = prompts_for(512, LENGTHS, seed=2)
    path = str(hybrid(arch))
    default = [o.token_ids for o in run(LLMEngine(EngineConfig(model=path, **SMALL)), prompts)]
    eager = LLMEngine(EngineConfig(model=path, **SMALL, enforce_eager=True, async_scheduling=False))
    assert [o.token_ids for o in run(eager, prompts)] == default
    tight = LLMEngine(EngineConfig(model=path, **SMALL | dict(num_blocks=7, block_size=8)))
    outputs = run(tight, prompts)
    assert tight.stats.preemptions > 0, "the pool was meant to be too small for 3 sequences"
    assert [o.token_ids for o in outputs] == default
    check_against_oracle(outputs, prompts, oracles[arch], MAX_TOKENS)


def test_the_state_pool_holds_each_linear_layers_arrays_per_slot(hybrid):
    engine = LLMEngine(EngineConfig(model=str(hybrid("qwen3_next")), **SMALL))
    spec = engine.model.state_spec
    # Layers 0 and 2 are gated delta nets (full attention every 2nd layer): a convolution over
    # the last 3 q|k|v inputs (2 x 2 x 16 + 4 x 16 channels) and a [4 heads, 16, 16] delta state.
    conv, delta = StateArray((3, 128), mx.float32), StateArray((4, 16, 16), mx.float32)
    assert spec.layers == ((conv, delta), (conv, delta))
    assert spec.bytes_per_sequence == 2 * (3 * 128 + 4 * 16 * 16) * 4
    states = engine.runner.cache.states
    # 3 sequences, 3 prefix snapshots (max_num_seqs by default) and the scratch slot.
    assert states.num_slots == states.num_snapshots == 3 and states.nbytes == 7 * spec.bytes_per_sequence
    assert engine.model.kv_spec.num_layers == 2  # only the attention layers have K/V blocks
    assert ("state pool: 3 sequences + 3 prefix snapshots, 11.0 KiB each (2 linear layers; 0.1 MiB with "
            "the scratch slot); prefix hits resume from state snapshots, 11.0 KiB per cached block boundary"
            in engine.memory_summary())


def test_the_state_pool_is_paid_for_out_of_the_kv_budget(hybrid):
    path, seqs = str(hybrid("qwen3_next")), SMALL["max_num_seqs"]
    engine = LLMEngine(EngineConfig(model=path, max_num_seqs=seqs, kv_cache_bytes=10**6,
                                    num_state_snapshots=2))
    states = (seqs + 2 + 1) * engine.model.state_spec.bytes_per_sequence
    block = engine.model.kv_spec.bytes_per_block(16, mx.float32)
    assert engine.config.num_blocks == (10**6 - states) // block
    with pytest.raises(ValueError, match=r", of which the state pool takes 67584 \(3 sequences, 2 "
                                         r"snapshots\), holds no block.*lower --max-num-seqs or "
                                         r"--num-state-snapshots"):
        LLMEngine(EngineConfig(model=path, max_num_seqs=seqs, kv_cache_bytes=states + block - 1,
                               num_state_snapshots=2))


@pytest.mark.parametrize("arch", HYBRIDS)
def test_a_second_turn_resumes_from_a_state_snapshot(hybrid, oracles, arch):
    """Turn 1 leaves snapshots where its prompt's last full block ends (32: its one chunk is cut
    there, the rest follows) and where decoding ended a block (48); a second turn resumes at 48,
    prompts sharing turn 1's prompt at 32, with the tokens and logprobs of computing them all."""
    path = str(hybrid(arch))
    engine = LLMEngine(EngineConfig(model=path, **SMALL | dict(max_num_batched_tokens=64)))
    assert engine.config.enable_prefix_caching and engine.config.num_state_snapshots == 3
    first_prompt, *suffixes = prompts_for(engine.vocab_size, [40, 7, 9, 3], seed=3)
    (first,) = run(engine, [first_prompt], max_tokens=10)
    assert engine.scheduler.block_manager.snapshots.num_filed == 2
    second_turn = first_prompt + first.token_ids + suffixes[0]
    prompts = [second_turn, first_prompt + suffixes[1], first_prompt + suffixes[2]]
    outputs = run(engine, prompts)
    assert [o.num_cached_tokens for o in outputs] == [48, 32, 32]
    check_against_oracle([first], [first_prompt], oracles[arch], 10)
    check_against_oracle(outputs, prompts, oracles[arch], MAX_TOKENS)
    uncached = LLMEngine(EngineConfig(model=path, **SMALL, enable_prefix_caching=False))
    assert [o.token_ids for o in run(uncached, prompts)] == [o.token_ids for o in outputs]


def test_a_prefix_without_its_snapshot_is_recomputed(hybrid, oracles):
    """One snapshot slot: the state at 48 (decoding) replaces those at 16 and 32 (the prompt), so a
    prompt sharing only the first 40 tokens has no state to resume from and computes them all;
    evicting the cached blocks drops their snapshots too."""
    engine = LLMEngine(EngineConfig(model=str(hybrid("lfm2")), **SMALL, num_state_snapshots=1))
    prompt, suffix = prompts_for(engine.vocab_size, [40, 5], seed=4)
    (first,) = run(engine, [prompt], max_tokens=10)
    prompts = [prompt + first.token_ids + suffix, prompt + suffix]
    outputs = [run(engine, [p])[0] for p in prompts]
    assert [o.num_cached_tokens for o in outputs] == [48, 0]
    assert engine.scheduler.block_manager.num_cached_blocks >= 3, "the blocks were there; the state was not"
    check_against_oracle(outputs, prompts, oracles["lfm2"], MAX_TOKENS)
    engine.reset_prefix_cache()
    assert engine.scheduler.block_manager.snapshots.num_filed == 0
    (again,) = run(engine, prompts[:1])
    assert again.num_cached_tokens == 0 and again.token_ids == outputs[0].token_ids


def test_hybrid_prefix_caching_off_computes_every_prompt(hybrid):
    for off in (dict(enable_prefix_caching=False), dict(num_state_snapshots=0)):
        engine = LLMEngine(EngineConfig(model=str(hybrid("lfm2")), **SMALL, **off))
        assert not engine.config.enable_prefix_caching and engine.runner.cache.states.num_snapshots == 0
        prompt = prompts_for(engine.vocab_size, [40], seed=3)[0]
        first, second = run(engine, [prompt]), run(engine, [prompt])
        assert second[0].num_cached_tokens == 0 and second[0].token_ids == first[0].token_ids
        assert "prefix caching off (no state snapshots)" in engine.memory_summary()


def test_aborted_and_finished_requests_give_their_state_slot_back(hybrid):
    engine = LLMEngine(EngineConfig(model=str(hybrid("nemotron_h")), **SMALL))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts_for(engine.vocab_size, [5, 5, 5, 5], seed=4)]
    engine.step()
    assert engine.scheduler.num_free_state_slots == 0  # three running, one waiting
    engine.abort_request(ids[0])
    assert engine.scheduler.num_free_state_slots == 1
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.scheduler.num_free_state_slots == SMALL["max_num_seqs"]


def test_hybrid_refuses_what_would_need_its_state_rolled_back(hybrid):
    path = str(hybrid("qwen3_5"))
    with pytest.raises(ValueError, match="speculative decoding needs rejected drafts rolled back"):
        LLMEngine(EngineConfig(model=path, **SMALL, speculative_config={"method": "ngram"}))
    engine = LLMEngine(EngineConfig(model=path, **SMALL))
    with pytest.raises(ValueError, match="Predicted Outputs are not served for this model"):
        engine.add_request([5, 6, 7], SamplingParams(max_tokens=4, prediction=[8, 9]))
    with pytest.raises(ValueError, match="tensor parallelism does not split yet"):
        engine.model.shard(None)
    assert not engine.has_unfinished_requests()


def test_a_purely_recurrent_model_is_refused_at_load(tmp_path):
    from model_factory import save_random_model

    config = {"model_type": "mamba2", "num_heads": 4, "head_dim": 16, "vocab_size": 512, "hidden_size": 64,
              "intermediate_size": 128, "state_size": 16, "num_hidden_layers": 2, "layer_norm_epsilon": 1e-5,
              "conv_kernel": 4, "n_groups": 1, "use_bias": False, "use_conv_bias": True,
              "tie_word_embeddings": False, "time_step_limit": [0.0, 100.0], "time_step_rank": 4}
    path = save_random_model(tmp_path / "mamba2", config)
    with pytest.raises(ValueError, match="has no attention layer"):
        LLMEngine(EngineConfig(model=str(path), **SMALL))


def test_mlx_lm_still_runs_the_routed_mixers_as_before(hybrid, oracles):
    """Outside the engine (mlx-lm's own caches) a routed mixer runs mlx-lm's code unchanged."""
    engine = LLMEngine(EngineConfig(model=str(hybrid("falcon_h1")), **SMALL))
    prompt = prompts_for(engine.vocab_size, [20], seed=5)[0]
    tokens = [int(t) for t, _ in generate_step(mx.array(prompt), engine.model.model, max_tokens=MAX_TOKENS)]
    assert tokens == oracles["falcon_h1"](prompt, MAX_TOKENS)[0]
