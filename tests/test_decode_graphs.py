"""Captured decode graphs: buckets, one capture per bucket, harmless padding rows."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from pico_vllm import EngineConfig, LLMEngine, SamplingParams
from pico_vllm.engine.decode_graphs import buckets, round_up

GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def test_buckets_are_powers_of_two_and_halfway_between_capped_by_the_limit():
    assert buckets(64) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    assert buckets(40) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 40]
    assert buckets(4) == [1, 2, 3, 4]
    assert buckets(1) == [1]
    assert round_up(5, buckets(64)) == 6 and round_up(23, buckets(64)) == 24
    assert round_up(13, buckets(40)) == 16
    with pytest.raises(ValueError, match="exceeds the largest bucket 40"):
        round_up(41, buckets(40))


def test_a_bucket_is_captured_once_and_reused(random_model):
    engine = LLMEngine(EngineConfig(model=str(random_model("llama", head_dim=32)), num_blocks=64,
                                    block_size=8))
    graphs = engine.runner.graphs
    used = []
    bucket = graphs.bucket
    graphs.bucket = lambda *args: used.append(bucket(*args)) or used[-1]
    for n, out in ((5, 40), (9, 25), (17, 10), (4, 5)):  # batch bucket 4, then 3, 2, 1
        engine.add_request(list(range(3, 3 + n)), SamplingParams(max_tokens=out, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    assert len(used) > 3 * len(set(used)), "decode steps should mostly reuse a bucket"
    assert {b for b, _ in used} == {4, 3, 2, 1}, "the batch shrinks as requests finish"
    assert len({w for _, w in used}) >= 3, "contexts grow across width buckets"
    assert graphs.captures == len(set(used))


def test_eager_capture_traces_every_bucket_at_start(random_model):
    engine = LLMEngine(EngineConfig(model=str(random_model("llama", head_dim=32)), num_blocks=64,
                                    max_num_seqs=4, max_model_len=64, capture_graphs="startup"))
    graphs = engine.runner.graphs
    assert graphs.captures == len(graphs.all_buckets()) == 4 * 4  # batch 1,2,3,4 x width 1,2,3,4
    engine.add_request([5, 6, 7], GREEDY)
    while engine.has_unfinished_requests():
        engine.step()
    assert graphs.captures == 16  # nothing new to trace


def test_padding_rows_write_only_the_scratch_block(random_model):
    """Five live sequences run in a batch bucket of 6: the padding row must write the scratch
    block and nothing else, and the live rows only their own new slots."""
    engine = LLMEngine(EngineConfig(model=str(random_model("qwen3", head_dim=32)), num_blocks=32,
                                    block_size=8))
    for start, n in ((3, 4), (100, 11), (200, 20), (300, 6), (400, 9)):
        engine.add_request(list(range(start, start + n)), GREEDY)
    engine.step()  # the prompts' prefill (eager, mixed)
    cache = engine.runner.cache
    for i, array in enumerate(cache.state):  # poison every slot, live ones included
        cache.state[i] = mx.full(array.shape, 7.0, array.dtype)
    before = [np.array(a) for a in cache.state]
    expected_slots = {(cache.scratch_block, 0)}
    for seq in engine.scheduler.running:
        position = seq.num_computed_tokens
        expected_slots.add((seq.block_table[position // 8], position % 8))

    assert engine.runner.graphs.bucket(len(engine.scheduler.running), 1)[0] == 6
    engine.step()  # decode-only: 5 rows padded to 6
    assert engine.runner.graphs.captures == 1
    for old, new in zip(before, cache.state):
        changed = np.argwhere((np.array(new) != old).any(axis=(0, 3)))  # [block, offset] pairs
        assert {tuple(map(int, c)) for c in changed} == expected_slots
