"""The Metal paged-attention kernel, run on the CPU from the exact source MLX generates, against a
float64 reference: the matrix of shapes, planted faults (mutations), and ASan/TSan runs."""

from __future__ import annotations

import shutil

import mlx.core as mx
import numpy as np
import pytest
from harness import build, capture_msl, run

from metal_kernels.kernel import (
    build_kernel,
    kernel_source,
    launch_config,
    merge_partitions,
    paged_attention_partials,
)

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (apt-get install g++)")

NUM_Q_HEADS = 8
TOLERANCE = {mx.float32: 2e-5, mx.float16: 2e-4}  # outputs are fp32 partials in both cases
INVALID_BLOCK = 1 << 28  # fills block-table padding: any read past a context is out of bounds


def make_case(rng, group, head_dim, block_size, context_lens, dtype, num_kv_heads=None):
    """Random q/K/V, a pool with shuffled non-contiguous blocks, and padded block tables."""
    num_kv_heads = num_kv_heads or NUM_Q_HEADS // group
    blocks_per_seq = [-(-c // block_size) for c in context_lens]
    max_blocks = max(max(blocks_per_seq), 1) + 1  # one more: padding every row carries
    num_blocks = sum(blocks_per_seq) + 3
    owner = rng.permutation(num_blocks)
    tables = np.full((len(context_lens), max_blocks), INVALID_BLOCK, np.int32)
    start = 0
    for row, n in enumerate(blocks_per_seq):
        tables[row, :n] = owner[start : start + n]
        start += n

    def rand(*shape):
        return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)

    return (
        rand(len(context_lens), num_kv_heads * group, head_dim),
        rand(num_kv_heads, num_blocks, block_size, head_dim),
        rand(num_kv_heads, num_blocks, block_size, head_dim),
        mx.array(tables),
        mx.array(np.array(context_lens, np.int32)),
    )


def reference(q, k_pool, v_pool, tables, context_lens, scale):
    """float64 numpy: gather each sequence's tokens, softmax(q.k * scale) @ v per head."""
    q, k_pool, v_pool = (np.array(a.astype(mx.float32), np.float64) for a in (q, k_pool, v_pool))
    tables, context_lens = np.array(tables), np.array(context_lens)
    batch, num_q_heads, _ = q.shape
    num_kv_heads, block_size = k_pool.shape[0], k_pool.shape[2]
    group = num_q_heads // num_kv_heads
    out = np.zeros(q.shape)
    for b in range(batch):
        t = np.arange(context_lens[b])
        if not len(t):
            continue
        slot = (tables[b, t // block_size], t % block_size)
        keys = k_pool[:, slot[0], slot[1]].transpose(1, 0, 2)  # [T, Hkv, D]
        values = v_pool[:, slot[0], slot[1]].transpose(1, 0, 2)
        for h in range(num_q_heads):
            scores = keys[:, h // group] @ q[b, h] * scale
            p = np.exp(scores - scores.max())
            out[b, h] = (p / p.sum()) @ values[:, h // group]
    return out


def emulate(case, scale, partition_size, source=None, sanitizer=None):
    """Run the kernel's generated MSL on the CPU; returns (process result, o_part, ml_part)."""
    q, k_pool, v_pool, tables, context_lens = case
    kernel = build_kernel(source, name="pico_paged_attention_sim") if source else build_kernel()

    def call(*args):
        return paged_attention_partials(
            *args, scale, partition_size=partition_size, kernel=kernel, verbose=True
        )

    program = build(capture_msl(call, *case), sanitizer)
    config = launch_config(q, k_pool, tables, partition_size)
    inputs = {
        "q": np.array(q), "k_pool": np.array(k_pool), "v_pool": np.array(v_pool),
        "block_tables": np.array(tables), "context_lens": np.array(context_lens),
        "scale": np.array(scale, np.float32),
    }
    # Poisoned outputs: every element the kernel owes must be overwritten.
    outputs = {
        name: np.full(shape, np.nan, np.float32)
        for name, shape in zip(("o_part", "ml_part"), config["output_shapes"])
    }
    env = {"TSAN_OPTIONS": "halt_on_error=1 exitcode=66", "ASAN_OPTIONS": "detect_leaks=0"}
    result = run(program, inputs, outputs, config["grid"], config["threadgroup"], env)
    return result, outputs["o_part"], outputs["ml_part"]


def check(case, dtype, partition_size, **kw):
    scale = case[0].shape[-1] ** -0.5
    result, o_part, ml_part = emulate(case, scale, partition_size, **kw)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not np.isnan(o_part).any(), "the kernel left output elements unwritten"
    assert not np.isnan(ml_part[..., 1]).any()
    out = np.array(merge_partitions(mx.array(o_part), mx.array(ml_part)))
    expected = reference(*case, scale)
    np.testing.assert_allclose(out, expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def contexts_for(block_size: int, partition_size: int) -> list[int]:
    """Edges: 1 token, around a block, around partition boundaries, several partitions, and an
    empty (padding) row."""
    p = partition_size
    return [1, block_size - 1, block_size, block_size + 1, p - 1, p, p + 1, 3 * p + 5, 0]


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_fp32_matrix(group, head_dim, block_size):
    rng = np.random.default_rng([group, head_dim, block_size])
    case = make_case(rng, group, head_dim, block_size, contexts_for(block_size, 64), mx.float32)
    check(case, mx.float32, partition_size=64)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_fp16_matrix(group, head_dim):
    rng = np.random.default_rng([group, head_dim, 16, 1])
    case = make_case(rng, group, head_dim, 16, contexts_for(16, 64), mx.float16)
    check(case, mx.float16, partition_size=64)


@pytest.mark.parametrize("head_dim", [80, 96, 256])
def test_other_head_dims(head_dim):
    rng = np.random.default_rng([head_dim])
    case = make_case(rng, 4, head_dim, 16, contexts_for(16, 64), mx.float32)
    check(case, mx.float32, partition_size=64)


@pytest.mark.parametrize("group,num_kv_heads", [(3, 3), (7, 2), (6, 2)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_uneven_gqa_groups_of_real_models(group, num_kv_heads, head_dim):
    """SmolLM2 (9 q / 3 kv heads), Qwen2.5-0.5B (14 / 2), Qwen2.5-1.5B (12 / 2)."""
    rng = np.random.default_rng([group, num_kv_heads, head_dim])
    case = make_case(rng, group, head_dim, 16, contexts_for(16, 64), mx.float32, num_kv_heads)
    check(case, mx.float32, partition_size=64)


@pytest.mark.parametrize("group", [1, 8])
def test_long_context_with_the_default_partition_size(group):
    rng = np.random.default_rng([group, 2048])
    case = make_case(rng, group, 128, 16, [2100, 513, 7], mx.float32)
    check(case, mx.float32, partition_size=512)


def _mutated(old: str, new: str) -> str:
    source = kernel_source()
    assert old in source, f"the mutation target {old!r} is gone from the kernel"
    return source.replace(old, new)


def test_mutation_removed_barrier_is_caught():
    """Without the barrier, simdgroup 0 merges before the others have written: TSan reports the
    race (and the values may be wrong too)."""
    source = _mutated("metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);", "")
    rng = np.random.default_rng(1)
    case = make_case(rng, 2, 64, 16, [40, 200, 3], mx.float32)
    with pytest.raises(AssertionError):
        check(case, mx.float32, partition_size=64, source=source, sanitizer="thread")


def test_mutation_block_index_off_by_one_is_caught():
    source = _mutated("block_tables[b * max_blocks + t / BS]", "block_tables[b * max_blocks + t / BS + 1]")
    rng = np.random.default_rng(2)
    case = make_case(rng, 2, 64, 16, [40, 200, 3], mx.float32)
    with pytest.raises(AssertionError):
        check(case, mx.float32, partition_size=64, source=source, sanitizer="address")


@pytest.mark.sanitizer
@pytest.mark.slow
@pytest.mark.parametrize("sanitizer", ["address", "thread"])
@pytest.mark.parametrize("group,head_dim,block_size", [(1, 64, 8), (4, 128, 16), (8, 64, 32)])
def test_sanitizers_are_clean(sanitizer, group, head_dim, block_size):
    rng = np.random.default_rng([group, head_dim, block_size, 7])
    case = make_case(rng, group, head_dim, block_size, [1, block_size + 1, 70, 0], mx.float32)
    check(case, mx.float32, partition_size=64, sanitizer=sanitizer)
