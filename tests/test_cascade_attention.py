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


def cascade_case(rng, lens, sets, num_kv_heads=2, group=3, head_dim=64):
    """q, pools and whole block tables where the rows of each set ``members: num_shared`` in
    ``sets`` start with the same ``num_shared`` blocks; plus the cascade's own arrays (what the
    runner builds), with one padding slot per set."""
    width = max(-(-n // BLOCK_SIZE) for n in lens) + 1
    num_blocks = len(lens) * width + sum(sets.values()) + 1
    ids = iter(rng.permutation(np.arange(1, num_blocks)).tolist())
    tables = np.zeros((len(lens), width), np.int32)
    set_of = {b: members for members in sets for b in members}
    shared_blocks = {members: [next(ids) for _ in range(n)] for members, n in sets.items()}
    for b, n in enumerate(lens):
        for j in range(-(-n // BLOCK_SIZE)):
            members = set_of.get(b)
            tables[b, j] = shared_blocks[members][j] if members and j < sets[members] else next(ids)
    slots = max(len(m) for m in sets) + 1
    set_tables = np.zeros((len(sets), max(sets.values())), np.int32)
    set_rows, set_lens = np.zeros((len(sets), slots), np.int32), np.zeros((len(sets), slots), np.int32)
    row_slots = np.full(len(lens), len(sets) * slots, np.int32)
    skip = np.zeros(len(lens), np.int32)
    for s, (members, n) in enumerate(sets.items()):
        set_tables[s, :n] = shared_blocks[members]
        for r, b in enumerate(members):
            set_rows[s, r], set_lens[s, r], row_slots[b], skip[b] = b, n * BLOCK_SIZE, s * slots + r, n
    suffix = np.zeros_like(tables)
    for b in range(len(lens)):
        suffix[b, : width - skip[b]] = tables[b, skip[b]:]

    def rand(*shape):
        return mx.array(rng.standard_normal(shape).astype(np.float32))

    q = 3 * rand(len(lens), num_kv_heads * group, head_dim)  # peaked scores, as trained models have
    pools = [rand(num_kv_heads, num_blocks, BLOCK_SIZE, head_dim) for _ in "kv"]
    whole = (q, *pools, mx.array(tables), mx.array(np.array(lens, np.int32)))
    parts = tuple(mx.array(a) for a in (set_tables, set_rows, set_lens, row_slots, suffix,
                                        np.array(lens, np.int32) - skip * BLOCK_SIZE))
    return whole, parts


def faulty(parts, where: int):
    """``parts`` with one set member's shared part one token short."""
    set_lens = np.array(parts[2])
    set_lens.flat[where] -= 1
    return parts[:2] + (mx.array(set_lens),) + parts[3:]


@pytest.mark.parametrize("variant", ["plain", "softcap", "sinks"])
@pytest.mark.parametrize("group", [1, 3, 8])
def test_cascade_equals_plain_paged_attention(variant, group):
    # Two sets over blocks of their own (one of them a verified chunk's positions: contexts one
    # token apart), members with contexts just past the shared blocks (a suffix of one token) and
    # far past them, a row outside every set, and a padding row (context 0).
    rng = np.random.default_rng(group)
    lens = [97, 65, 300, 0, 81, 140, 113, 114, 115, 116]
    whole, parts = cascade_case(rng, lens, {(0, 1, 4, 5): 4, (6, 7, 8, 9): 7}, group=group)
    q, k_pool, v_pool, tables, context_lens = whole
    kw = {"plain": {}, "softcap": {"softcap": 5.0},
          "sinks": {"sinks": mx.array(rng.standard_normal(q.shape[1]).astype(np.float32))}}[variant]
    scale = q.shape[-1] ** -0.5
    want = paged_attention_reference(q, k_pool, v_pool, tables, context_lens, scale, **kw)
    got = cascade_attention(q, k_pool, v_pool, *parts, scale, **kw)
    assert mx.abs(got - want).max().item() < 1e-5
    assert mx.all(got[3] == 0).item()  # the padding row stays zeros


@pytest.mark.parametrize("where", [0, 6])  # the first set's first member, the second set's second
def test_a_shared_part_off_by_one_token_is_caught(where):
    # The planted fault: one member's shared part reads one token too few. The comparison above
    # sees it, in that row only.
    whole, parts = cascade_case(np.random.default_rng(0), [97, 65, 81, 140, 113, 114, 115],
                                {(0, 1, 2, 3): 4, (4, 5, 6): 7})
    q, k_pool, v_pool, tables, context_lens = whole
    scale = q.shape[-1] ** -0.5
    want = paged_attention_reference(q, k_pool, v_pool, tables, context_lens, scale)
    got = cascade_attention(q, k_pool, v_pool, *faulty(parts, where), scale)
    wrong = (mx.abs(got - want).max(axis=(1, 2)) > 1e-4).tolist()  # exact rows: < 1e-5
    assert wrong == [b == {0: 0, 6: 5}[where] for b in range(7)]


def test_each_set_is_one_matrix_over_its_blocks_gathered_once():
    # Rows outside every set (row_slots past the last slot) weigh nothing: l = 0 and o = 0, never NaN.
    whole, parts = cascade_case(np.random.default_rng(1), [70, 70, 70, 90, 90], {(0, 2): 4, (3, 4): 5})
    q, k_pool, v_pool = whole[:3]
    o, ml = shared_prefix_partials(q, k_pool, v_pool, *parts[:4], q.shape[-1] ** -0.5)
    assert o.shape == (5, q.shape[1], 1, q.shape[2]) and ml.shape == (5, q.shape[1], 1, 2)
    assert mx.all(o[1] == 0).item() and mx.all(ml[1, :, :, 1] == 0).item()
    assert mx.all(ml[[0, 2, 3, 4], :, :, 1] > 0).item() and not mx.any(mx.isnan(o)).item()


def tables_of(*rows):
    return [np.array(r, np.int32) for r in rows]


def test_the_plan_takes_each_first_blocks_rows_and_their_common_blocks():
    a = [1, 2, 3, 4, 5, 6, 40]
    tables = tables_of(a, [1, 2, 3, 4, 5, 7, 41], a[:6] + [42], [9, 10, 11, 12, 13, 14, 43],
                       a[:6] + [44], [9, 10, 11, 12, 13, 15, 45], [20, 21, 22])
    lens = [7 * BLOCK_SIZE] * 6 + [3 * BLOCK_SIZE]
    owners = list(range(7))
    plan = plan_shared_prefix(tables, lens, owners, BLOCK_SIZE, min_saved=2)
    # Rows 1 leaves the first set at block 5, row 5 the second at block 4; row 6 shares nothing.
    assert plan == [([0, 1, 2, 4], 5), ([3, 5], 5)]
    assert [s.saved_blocks for s in plan] == [15, 5]
    # A block is shared only when it lies wholly before every member's query token: a member whose
    # context ends right at a block's end keeps that block to itself.
    lens[2] = 5 * BLOCK_SIZE
    assert plan_shared_prefix(tables, lens, owners, BLOCK_SIZE, min_saved=2)[0] == ([0, 1, 2, 4], 4)
    # A set is kept only where it saves min_saved block reads.
    assert plan_shared_prefix(tables, lens, owners, BLOCK_SIZE, min_saved=6) == [([0, 1, 2, 4], 4)]
    assert plan_shared_prefix(tables, lens, owners, BLOCK_SIZE, min_saved=13) == []
    assert plan_shared_prefix([], [], [], BLOCK_SIZE) == []


def test_a_verified_chunks_positions_are_one_set_over_their_sequences_blocks():
    # Two sequences behind one 2-block prompt, each verifying drafts (4 rows each, contexts one
    # token apart): one set per sequence over its 6 whole blocks saves more than one set over the
    # 2 blocks all eight rows share.
    prompt = [1, 2]
    first, second = prompt + [3, 4, 5, 6, 7], prompt + [8, 9, 10, 11, 12]
    tables = tables_of(*[first] * 4, *[second] * 4)
    lens = [6 * BLOCK_SIZE + 1 + j for j in range(4)] * 2
    plan = plan_shared_prefix(tables, lens, [0] * 4 + [1] * 4, BLOCK_SIZE)
    assert plan == [([0, 1, 2, 3], 6), ([4, 5, 6, 7], 6)]
    # Thirty rows behind 3 common blocks (too few to share) would save more than the two
    # verifying sequences' sets over their 10 blocks; the sets that can be kept win.
    verifying = [[1, 2, 3] + [40 + 10 * s + j for j in range(7)] for s in range(2)]
    tables = tables_of(*[verifying[0]] * 5, *[verifying[1]] * 5,
                       *[[1, 2, 3, 100 + b, 200 + b] for b in range(20)])
    lens = [10 * BLOCK_SIZE + 1 + j for j in range(5)] * 2 + [5 * BLOCK_SIZE] * 20
    owners = [0] * 5 + [1] * 5 + list(range(2, 22))
    plan = plan_shared_prefix(tables, lens, owners, BLOCK_SIZE)
    assert plan == [([0, 1, 2, 3, 4], 10), ([5, 6, 7, 8, 9], 10)]
    # Eight requests behind a long prompt, two positions each: one set over the prompt.
    tables = tables_of(*[list(range(1, 21)) + [30 + b // 2] for b in range(16)])
    lens = [20 * BLOCK_SIZE + 1 + b % 2 for b in range(16)]
    owners = [b // 2 for b in range(16)]
    assert plan_shared_prefix(tables, lens, owners, BLOCK_SIZE) == [(list(range(16)), 20)]


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
