"""Cascade attention: decode rows sharing leading blocks read them once, together, and their own
blocks separately, merged by log-sum-exp. Equal to plain paged attention to 1e-5, planned only
where rows really share blocks, and token-exact in the engine against mlx-lm and against the
engine without it."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from test_engine_parity import Oracle, assert_matches, assert_pool_clean

from metal_kernels import cascade_attention, paged_attention_reference
from metal_kernels.cascade import shared_prefix_partials
from pico_vllm import EngineConfig, LLMEngine, SamplingParams
from pico_vllm.engine.cascade import plan_shared_prefix

BLOCK_SIZE = 16


def cascade_case(rng, lens, members, num_shared, num_kv_heads=2, group=3, head_dim=64):
    """q, pools and whole block tables where rows ``members`` start with the same
    ``num_shared`` blocks; plus the cascade's own arrays (what the runner builds)."""
    width = max(-(-n // BLOCK_SIZE) for n in lens) + 1
    num_blocks = len(lens) * width + num_shared + 1
    fresh = iter(rng.permutation(np.arange(num_shared + 1, num_blocks)).tolist())
    shared_blocks = rng.permutation(np.arange(1, num_shared + 1)).tolist()
    tables = np.zeros((len(lens), width), np.int32)
    for b, n in enumerate(lens):
        for j in range(-(-n // BLOCK_SIZE)):
            tables[b, j] = shared_blocks[j] if b in members and j < num_shared else next(fresh)
    shared_lens = np.array([num_shared * BLOCK_SIZE * (b in members) for b in range(len(lens))], np.int32)
    suffix = np.zeros_like(tables)
    for b in range(len(lens)):
        skip = shared_lens[b] // BLOCK_SIZE
        suffix[b, : width - skip] = tables[b, skip:]

    def rand(*shape):
        return mx.array(rng.standard_normal(shape).astype(np.float32))

    q = 3 * rand(len(lens), num_kv_heads * group, head_dim)  # peaked scores, as trained models have
    pools = [rand(num_kv_heads, num_blocks, BLOCK_SIZE, head_dim) for _ in "kv"]
    whole = (q, *pools, mx.array(tables), mx.array(np.array(lens, np.int32)))
    parts = (mx.array(shared_blocks, mx.int32), mx.array(shared_lens), mx.array(suffix),
             mx.array(np.array(lens, np.int32) - shared_lens))
    return whole, parts


@pytest.mark.parametrize("variant", ["plain", "softcap", "sinks"])
@pytest.mark.parametrize("group", [1, 3, 8])
def test_cascade_equals_plain_paged_attention(variant, group):
    # Members with contexts just past the shared blocks (a suffix of one token) and far past
    # them, a row outside the cascade, and a padding row (context 0).
    rng = np.random.default_rng(group)
    lens, members, num_shared = [97, 65, 300, 0, 81, 140], {0, 1, 4, 5}, 4
    whole, parts = cascade_case(rng, lens, members, num_shared, group=group)
    q, k_pool, v_pool, tables, context_lens = whole
    kw = {"plain": {}, "softcap": {"softcap": 5.0},
          "sinks": {"sinks": mx.array(rng.standard_normal(q.shape[1]).astype(np.float32))}}[variant]
    scale = q.shape[-1] ** -0.5
    want = paged_attention_reference(q, k_pool, v_pool, tables, context_lens, scale, **kw)
    got = cascade_attention(q, k_pool, v_pool, *parts, scale, **kw)
    assert mx.abs(got - want).max().item() < 1e-5
    assert mx.all(got[3] == 0).item()  # the padding row stays zeros


def test_a_shared_part_off_by_one_token_is_caught():
    # The planted fault: the shared part reads one token too few. The comparison above sees it.
    whole, parts = cascade_case(np.random.default_rng(0), [97, 65, 81, 140], {0, 1, 2, 3}, 4)
    q, k_pool, v_pool, tables, context_lens = whole
    scale = q.shape[-1] ** -0.5
    want = paged_attention_reference(q, k_pool, v_pool, tables, context_lens, scale)
    table, shared_lens, suffix_tables, suffix_lens = parts
    got = cascade_attention(q, k_pool, v_pool, table, shared_lens - 1, suffix_tables, suffix_lens, scale)
    assert mx.abs(got - want).max().item() > 1e-3


def test_the_shared_part_is_one_matrix_over_blocks_gathered_once():
    # Rows outside the cascade (shared_lens 0) weigh nothing: l = 0 and o = 0, never NaN.
    whole, parts = cascade_case(np.random.default_rng(1), [70, 70, 70], {0, 2}, 4)
    q, k_pool, v_pool = whole[:3]
    o, ml = shared_prefix_partials(q, k_pool, v_pool, parts[0], parts[1], q.shape[-1] ** -0.5)
    assert o.shape == (3, q.shape[1], 1, q.shape[2]) and ml.shape == (3, q.shape[1], 1, 2)
    assert mx.all(o[1] == 0).item() and mx.all(ml[1, :, :, 1] == 0).item()
    assert mx.all(ml[[0, 2], :, :, 1] > 0).item() and not mx.any(mx.isnan(o)).item()


def tables_of(*rows):
    return [np.array(r, np.int32) for r in rows]


def test_the_plan_takes_the_largest_set_sharing_a_first_block_and_their_common_blocks():
    a = [1, 2, 3, 4, 5, 6, 40]
    tables = tables_of(a, [1, 2, 3, 4, 5, 7, 41], a[:6] + [42], [9, 10, 11, 12, 13, 14, 43],
                       a[:6] + [44], [9, 10, 11, 12, 13, 15, 45])
    lens = [7 * BLOCK_SIZE] * 6
    plan = plan_shared_prefix(tables, lens, BLOCK_SIZE, min_rows=3, min_blocks=2)
    assert plan.rows == [0, 1, 2, 4] and plan.num_blocks == 5  # row 1 leaves them at block 5
    # A block is shared only when it lies wholly before every member's query token: a member whose
    # context ends right at a block's end keeps that block to itself.
    lens[2] = 5 * BLOCK_SIZE
    assert plan_shared_prefix(tables, lens, BLOCK_SIZE, min_rows=3, min_blocks=2).num_blocks == 4
    assert plan_shared_prefix(tables, lens, BLOCK_SIZE, min_rows=5, min_blocks=2) is None
    # Rows too short to hold min_blocks whole blocks stay out; the rest may still share enough.
    assert plan_shared_prefix(tables, lens, BLOCK_SIZE, min_rows=3, min_blocks=5) == ([0, 1, 4], 5)
    assert plan_shared_prefix(tables, lens, BLOCK_SIZE, min_rows=3, min_blocks=6) is None
    assert plan_shared_prefix([], [], BLOCK_SIZE) is None


SHARED = 90  # prompt tokens every request shares: 5 whole blocks
REGIMES = {
    "graphs": {},
    "eager": {"enforce_eager": True},
    "sync, chunked prefill": {"async_scheduling": False, "max_num_batched_tokens": 40},
}


@pytest.fixture(scope="module")
def cascade_setup(random_model):
    model = random_model("llama")
    rng = np.random.default_rng(0)
    prefix = rng.integers(3, 500, size=SHARED).tolist()
    prompts = [prefix + rng.integers(3, 500, size=n).tolist() for n in (3, 20, 41, 7, 60, 12)]
    return model, prompts, Oracle(model)


def run(model, prompts, params=None, **config) -> tuple[list[list[int]], list, LLMEngine]:
    """Every prompt to the end (greedy, 24 tokens, top-5 logprobs unless ``params[i]`` says)."""
    engine = LLMEngine(EngineConfig(model=str(model), block_size=BLOCK_SIZE, num_blocks=128, **config))
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=5)
    ids = [engine.add_request(p, params[i] if params else greedy) for i, p in enumerate(prompts)]
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    assert_pool_clean(engine)
    outs = [final[i] for i in ids]
    return [o.token_ids for o in outs], [o.top_logprobs for o in outs], engine


@pytest.mark.parametrize("regime", REGIMES)
def test_engine_with_a_shared_prefix_is_token_exact_with_and_without_cascade(cascade_setup, regime):
    model, prompts, oracle = cascade_setup
    tokens, logprobs, engine = run(model, prompts, **REGIMES[regime])
    plain_tokens, plain_logprobs, plain = run(model, prompts, disable_cascade_attn=True, **REGIMES[regime])
    assert engine.stats.cascade_steps > 0 and plain.stats.cascade_steps == 0
    assert tokens == plain_tokens
    for ours, theirs in zip(logprobs, plain_logprobs):  # the top 5 at every step: ids and values
        for step, (a, b) in enumerate(zip(ours, theirs)):
            assert [t for t, _ in a] == [t for t, _ in b], step
            assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < 1e-4, step
    for ours, prompt in zip(tokens, prompts):
        assert_matches(ours, prompt, oracle, 24)


def test_choices_of_one_prompt_share_its_blocks_and_sample_the_same(cascade_setup):
    # What the server's n=6 submits: one prompt six times, seeds 0..5, sampled.
    model, prompts, _ = cascade_setup
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=8, ignore_eos=True) for i in range(6)]
    tokens, _, engine = run(model, prompts[:1] * 6, params, enforce_eager=True)
    plain, _, _ = run(model, prompts[:1] * 6, params, enforce_eager=True, disable_cascade_attn=True)
    assert engine.stats.cascade_steps > 0 and tokens == plain and len(set(map(tuple, tokens))) > 1
