"""The Metal paged-attention kernel, run on the CPU from the exact source MLX generates, against a
float64 reference: the matrix of shapes, planted faults (mutations), and ASan/TSan runs."""

from __future__ import annotations

import shutil

import mlx.core as mx
import numpy as np
import pytest
from harness import build, capture_msl, run

from metal_kernels import TOLERANCE as SELF_CHECK_TOLERANCE
from metal_kernels.kernel import (
    MERGE_SOURCE_PATH,
    build_kernel,
    build_merge_kernel,
    kernel_source,
    launch_config,
    merge_config,
    merge_partitions,
    num_partitions,
    paged_attention_partials,
)

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (apt-get install g++)")

NUM_Q_HEADS = 8
# Partials are fp32 whatever the dtype; the output is rounded once to the dtype (bf16: 2^-8).
TOLERANCE = {mx.float32: 2e-5, mx.float16: 1e-3, mx.bfloat16: 8e-3}
INVALID_BLOCK = 1 << 28  # fills block-table padding: any read past a context is out of bounds
ENV = {"TSAN_OPTIONS": "halt_on_error=1 exitcode=66", "ASAN_OPTIONS": "detect_leaks=0"}


def make_case(rng, group, head_dim, block_size, context_lens, dtype, num_kv_heads=None, width=None):
    """Random q/K/V, a pool with shuffled non-contiguous blocks, and padded block tables
    (``width`` blocks wide; by default one more than the longest context needs)."""
    num_kv_heads = num_kv_heads or NUM_Q_HEADS // group
    max_blocks = width or max(-(-c // block_size) for c in context_lens) + 1
    blocks_per_seq = [min(-(-c // block_size), max_blocks) for c in context_lens]
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


def reference(q, k_pool, v_pool, tables, context_lens, scale, window=None, softcap=None, sinks=None):
    """float64 numpy: gather each sequence's tokens (the last ``window`` of them), softmax(q.k *
    scale, softcapped; a sink logit per head in the denominator) @ v per head."""
    q, k_pool, v_pool = (np.array(a.astype(mx.float32), np.float64) for a in (q, k_pool, v_pool))
    tables, context_lens = np.array(tables), np.array(context_lens)
    sinks = None if sinks is None else np.array(sinks, np.float64)
    batch, num_q_heads, _ = q.shape
    num_kv_heads, block_size = k_pool.shape[0], k_pool.shape[2]
    group = num_q_heads // num_kv_heads
    out = np.zeros(q.shape)
    for b in range(batch):
        end = min(context_lens[b], tables.shape[1] * block_size)  # the kernel clamps too
        t = np.arange(max(0, end - window) if window else 0, end)
        if not len(t):
            continue
        slot = (tables[b, t // block_size], t % block_size)
        keys = k_pool[:, slot[0], slot[1]].transpose(1, 0, 2)  # [T, Hkv, D]
        values = v_pool[:, slot[0], slot[1]].transpose(1, 0, 2)
        for h in range(num_q_heads):
            scores = keys[:, h // group] @ q[b, h] * scale
            if softcap:
                scores = softcap * np.tanh(scores / softcap)
            top = scores.max() if sinks is None else max(scores.max(), sinks[h])
            p = np.exp(scores - top)
            total = p.sum() + (0.0 if sinks is None else np.exp(sinks[h] - top))
            out[b, h] = (p / total) @ values[:, h // group]
    return out


def numpy_of(a: mx.array) -> np.ndarray:
    """The array's bytes as numpy holds them (bf16, which numpy lacks, as its uint16 bits)."""
    return np.array(a.view(mx.uint16)) if a.dtype == mx.bfloat16 else np.array(a)


def emulate(case, scale, partitions=None, source=None, merge_source=None, sanitizer=None, views=None,
            window=None, softcap=None, sinks=None):
    """Run both kernels' generated MSL on the CPU; returns (pass-1 result, pass-2 result,
    o_part, ml_part, out as float32, the pass-1 launch)."""
    q, k_pool, v_pool, tables, context_lens = case
    kernel = build_kernel(source, name="pico_paged_attention_sim") if source else build_kernel()
    merge = (build_merge_kernel(merge_source, name="pico_paged_attention_merge_sim") if merge_source
             else build_merge_kernel())

    def pass1(*args):
        return paged_attention_partials(*args, scale, window=window, softcap=softcap, partitions=partitions,
                                        kernel=kernel, verbose=True)

    config = launch_config(q, k_pool, tables, partitions, window)
    inputs = {
        "q": numpy_of(q), "k_pool": numpy_of(k_pool), "v_pool": numpy_of(v_pool),
        "block_tables": np.array(tables), "context_lens": np.array(context_lens),
        "scale": np.array(scale, np.float32),
        "blocks_per_part": np.array(config["blocks_per_part"], np.int32),
        "window": np.array(window or 0, np.int32), "softcap": np.array(softcap or 0.0, np.float32),
    } | (views or {})  # numpy views stand for inputs MLX passes uncopied, with their strides
    # Poisoned outputs: every element a kernel owes must be overwritten.
    partials = {name: np.full(shape, np.nan, np.float32)
                for name, shape in zip(("o_part", "ml_part"), config["output_shapes"])}
    first = run(build(capture_msl(pass1, *case), sanitizer), inputs, partials, config["grid"],
                config["threadgroup"], ENV)
    second, result = emulate_merge(partials["o_part"], partials["ml_part"], q.dtype, sinks, merge, sanitizer)
    return first, second, partials["o_part"], partials["ml_part"], result, config


def emulate_merge(o_part: np.ndarray, ml_part: np.ndarray, dtype, sinks=None, merge=None, sanitizer=None):
    """Pass 2's generated MSL on the CPU over these partials; returns (its run, out as float32)."""
    merge = merge or build_merge_kernel()
    sink_logits = mx.full((o_part.shape[1],), -mx.inf) if sinks is None else sinks.astype(mx.float32)

    def pass2(o, ml, s):
        return merge_partitions(o, ml, dtype, s, kernel=merge, verbose=True)

    merged = merge_config(mx.array(o_part), dtype)
    out = {"out": numpy_of(mx.full(merged["output_shapes"][0], mx.nan, dtype=dtype))}  # poisoned
    second = run(build(capture_msl(pass2, mx.array(o_part), mx.array(ml_part), sink_logits), sanitizer),
                 {"o_part": o_part, "ml_part": ml_part, "sinks": np.array(sink_logits)}, out,
                 merged["grid"], merged["threadgroup"], ENV)
    result = mx.array(out["out"])
    result = result.view(mx.bfloat16) if dtype == mx.bfloat16 else result
    return second, np.array(result.astype(mx.float32))


def check(case, dtype, partitions=None, window=None, softcap=None, sinks=None, **kw):
    scale = case[0].shape[-1] ** -0.5
    variants = dict(window=window, softcap=softcap, sinks=sinks)
    first, second, o_part, ml_part, out, config = emulate(case, scale, partitions, **variants, **kw)
    assert first.returncode == 0, first.stderr[-3000:]
    assert second.returncode == 0, second.stderr[-3000:]
    assert not np.isnan(o_part).any(), "pass 1 left output elements unwritten"
    assert not np.isnan(ml_part[..., 1]).any()
    assert not np.isnan(out).any(), "pass 2 left output elements unwritten (or wrote NaN)"
    expected = reference(*case, scale, **variants)
    np.testing.assert_allclose(out, expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    return config


WIDTH = 26  # blocks per table in the matrix: 4 partitions of 7 blocks (the last one 5)


def contexts_for(block_size: int, partitions: int = 4, width: int = WIDTH) -> list[int]:
    """Edges: 1 token, around a block, around the first partition boundary, several
    partitions, a full table, one longer than its table (clamped), and an empty (padding) row."""
    p = -(-width // partitions) * block_size  # tokens per partition
    full = width * block_size
    return [1, block_size - 1, block_size, block_size + 1, p - 1, p, p + 1, min(3 * p + 5, full - 3),
            full, full + 40, 0]


def check_matrix_case(seed, group, head_dim, block_size, dtype, num_kv_heads=None):
    rng = np.random.default_rng(seed)
    case = make_case(rng, group, head_dim, block_size, contexts_for(block_size), dtype, num_kv_heads,
                     width=WIDTH)
    config = check(case, dtype, partitions=4)
    assert config["grid"][0] == 4 * 4 * 32 and config["blocks_per_part"] == 7


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_fp32_matrix(group, head_dim, block_size):
    check_matrix_case([group, head_dim, block_size], group, head_dim, block_size, mx.float32)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_half_precision_matrix(group, head_dim, dtype):
    check_matrix_case([group, head_dim, 16, 1], group, head_dim, 16, dtype)


@pytest.mark.parametrize("head_dim", [80, 96, 256])
def test_other_head_dims(head_dim):
    check_matrix_case([head_dim], 4, head_dim, 16, mx.float32)


@pytest.mark.parametrize("group,num_kv_heads", [(3, 3), (7, 2), (6, 2), (16, 1)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_uneven_gqa_groups_of_real_models(group, num_kv_heads, head_dim):
    """SmolLM2 (9 q / 3 kv heads), Qwen2.5-0.5B (14 / 2), Qwen2.5-1.5B (12 / 2), and 16 query
    heads on one KV head (at head_dim 128 past the register cap: two threadgroups share it)."""
    check_matrix_case([group, num_kv_heads, head_dim], group, head_dim, 16, mx.float32, num_kv_heads)


@pytest.mark.parametrize("partitions", [1, 2, 3, 7, 64])
def test_every_partition_count_from_1_to_64(partitions):
    """Block-aligned partitions of a 64-block table: 1 (no split), uneven splits, one block each."""
    rng = np.random.default_rng([partitions])
    contexts = [1, 300, 64 * 16, 64 * 16 - 5, 0]
    case = make_case(rng, 2, 64, 16, contexts, mx.float32, num_kv_heads=1, width=64)
    config = check(case, mx.float32, partitions=partitions)
    assert config["output_shapes"][0][2] == partitions


@pytest.mark.parametrize("batch", [1, 9])
def test_the_run_time_partition_count_fills_the_gpu_and_stays_exact(batch):
    """SmolLM2's shape (9 query heads on 3 KV heads): at batch 1 a 32-block table splits into 8
    partitions (one block run per simdgroup of 4 blocks), 24 threadgroups rather than 3."""
    rng = np.random.default_rng([batch, 3])
    contexts = [(37 * i) % 500 + 1 for i in range(batch)]
    contexts[-1] = 0 if batch > 1 else contexts[-1]
    case = make_case(rng, 3, 64, 16, contexts, mx.float32, num_kv_heads=3, width=32)
    config = check(case, mx.float32)
    assert config["output_shapes"][0][2] == 8 and config["grid"][1:] == (3, batch)


@pytest.mark.parametrize("batch,threadgroups,width,expected", [
    (1, 3, 32, 8), (9, 3, 32, 8), (40, 3, 32, 5), (200, 3, 32, 1),  # SmolLM2, context <= 512
    (1, 8, 64, 16), (32, 8, 64, 2), (1, 8, 256, 64), (1, 8, 1024, 64),  # Llama-3.2-1B, 1k to 16k
    (1, 1, 2, 1),  # two blocks: one simdgroup's worth
])
def test_num_partitions(batch, threadgroups, width, expected):
    assert num_partitions(batch, threadgroups, width) == expected


def test_q_is_read_through_its_strides_uncopied():
    """The model hands the kernel q as a slice of its rotated q|k rows ([T, Hq + Hkv, D] ->
    [:, :Hq]): not row-contiguous. The kernel reads it in place through q_strides."""
    rng = np.random.default_rng(5)
    q, k_pool, v_pool, tables, lengths = make_case(rng, 2, 64, 16, [40, 200, 3, 0], mx.float32)
    rows = np.concatenate([np.array(q), rng.standard_normal((4, 4, 64)).astype(np.float32)], axis=1)
    view = rows[:, :8]  # what q[:, :Hq] is: rows 8 + 4 heads apart
    assert not view.flags.c_contiguous
    case = (mx.array(rows)[:, :8], k_pool, v_pool, tables, lengths)
    check(case, mx.float32, views={"q": view})


@pytest.mark.parametrize("group", [1, 8])
def test_long_context(group):
    rng = np.random.default_rng([group, 2048])
    case = make_case(rng, group, 128, 16, [2100, 513, 7], mx.float32)
    check(case, mx.float32)


@pytest.mark.parametrize("window", [1, 15, 16, 17, 40, 100, 5000])
@pytest.mark.parametrize("block_size", [8, 16])
def test_sliding_window(window, block_size):
    """Windows inside one block, at a block's edge, over several blocks and partitions, and wider
    than every context (the whole context); contexts at block edges, past the table, and 0."""
    rng = np.random.default_rng([window, block_size])
    contexts = [1, block_size, block_size + 1, 3 * block_size - 1, 200, WIDTH * block_size + 40, 0, 77]
    case = make_case(rng, 2, 64, block_size, contexts, mx.float32, width=WIDTH)
    config = check(case, mx.float32, window=window)
    covered = config["blocks_per_part"] * config["output_shapes"][0][2]
    assert covered >= min(WIDTH, -(-window // block_size) + 1)  # the partitions span the window


@pytest.mark.parametrize("partitions", [1, 3, 8])
def test_window_over_run_time_and_forced_partitions(partitions):
    rng = np.random.default_rng([partitions, 11])
    case = make_case(rng, 4, 128, 16, [500, 33, 300, 1], mx.float32, width=40)
    check(case, mx.float32, partitions=partitions, window=130)
    check(case, mx.float32, window=130)  # the launcher's own choice over the window's blocks


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_softcap_and_sinks(dtype):
    """Gemma 2's softcap on every score, gpt-oss's sinks in the merge, with a window (gpt-oss's
    sliding layers have all three but softcap), one partition and several."""
    rng = np.random.default_rng([7, dtype.size])
    case = make_case(rng, 4, 64, 16, [1, 17, 300, 0, 150], dtype, width=24)
    case = (case[0] * 4, *case[1:])  # large scores, so the cap binds
    sinks = mx.array(rng.standard_normal(8).astype(np.float32) * 2)
    for partitions in (1, 4):
        check(case, dtype, partitions=partitions, softcap=5.0)
        check(case, dtype, partitions=partitions, sinks=sinks)
        check(case, dtype, partitions=partitions, window=50, sinks=sinks, softcap=30.0)


def _mutated(old: str, new: str, path=None) -> str:
    source = kernel_source(path) if path else kernel_source()
    assert old in source, f"the mutation target {old!r} is gone from the kernel"
    return source.replace(old, new)


def test_mutation_removed_barrier_is_caught():
    """Without the barriers, simdgroup 0 merges before the others have written: TSan reports the
    race (and the values may be wrong too)."""
    source = _mutated("metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);", "")
    rng = np.random.default_rng(1)
    case = make_case(rng, 2, 64, 16, [40, 200, 3], mx.float32)
    with pytest.raises(AssertionError):
        check(case, mx.float32, partitions=1, source=source, sanitizer="thread")


def test_mutation_block_index_off_by_one_is_caught():
    source = _mutated("table[blk * table_step]", "table[(blk + 1) * table_step]")
    rng = np.random.default_rng(2)
    case = make_case(rng, 2, 64, 16, [40, 200, 3], mx.float32)
    with pytest.raises(AssertionError):
        check(case, mx.float32, source=source, sanitizer="address")


def test_mutation_wrong_partition_boundary_is_caught():
    """Each partition one block short: the last block of every partition is never read."""
    source = _mutated("part_begin + blocks_per_part", "part_begin + blocks_per_part - 1")
    rng = np.random.default_rng(3)
    case = make_case(rng, 2, 64, 16, [300, 200, 3], mx.float32, width=24)
    with pytest.raises(AssertionError):
        check(case, mx.float32, partitions=4, source=source)


def test_mutation_merge_ignoring_a_partition_weight_is_caught():
    source = _mutated("total += w;", "total += l;", MERGE_SOURCE_PATH)
    rng = np.random.default_rng(4)
    case = make_case(rng, 2, 64, 16, [300, 200, 3], mx.float32, width=24)
    with pytest.raises(AssertionError):
        check(case, mx.float32, partitions=4, merge_source=source)


def assert_caught(seed: int, q_scale: float = 1.0, **kw) -> None:
    """A planted fault (``source`` / ``merge_source`` in ``kw``) fails the check of a case that
    exercises it: three sequences over several partitions, at the variants given."""
    q, *rest = make_case(np.random.default_rng(seed), 2, 64, 16, [300, 200, 40], mx.float32, width=24)
    with pytest.raises(AssertionError):
        check((q * q_scale, *rest), mx.float32, **kw)


def test_mutation_window_off_by_one_is_caught():
    source = _mutated("metal::max(0, context_len - window)", "metal::max(0, context_len - window - 1)")
    assert_caught(5, source=source, window=50)


def test_mutation_window_partitions_from_the_table_start_are_caught():
    """Partitions laid over the table's first blocks, not the window's: the window is not read."""
    source = _mutated("first_token / BS + part * blocks_per_part", "part * blocks_per_part")
    assert_caught(6, source=source, window=50)


def test_mutation_softcap_skipped_is_caught():
    source = _mutated("if (softcap > 0.0f) {", "if (softcap < 0.0f) {")
    assert_caught(7, q_scale=4, source=source, softcap=5.0)  # large scores, so the cap binds


def test_mutation_sink_left_out_of_the_denominator_is_caught():
    source = _mutated("float total = sink > -INFINITY ? metal::fast::exp(sink - m_all) : 0.0f;",
                      "float total = 0.0f;", MERGE_SOURCE_PATH)
    assert_caught(8, merge_source=source, sinks=mx.ones(8))


@pytest.mark.sanitizer
@pytest.mark.slow
@pytest.mark.parametrize("sanitizer", ["address", "thread"])
@pytest.mark.parametrize("group,head_dim,block_size", [(1, 64, 8), (4, 128, 16), (8, 64, 32)])
def test_sanitizers_are_clean(sanitizer, group, head_dim, block_size):
    rng = np.random.default_rng([group, head_dim, block_size, 7])
    case = make_case(rng, group, head_dim, block_size, [1, block_size + 1, 70, 0, 300], mx.float32)
    check(case, mx.float32, sanitizer=sanitizer)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16], ids=["fp32", "fp16"])
def test_cascade_through_both_kernels_equals_the_whole_tables(dtype):
    """Cascade attention as it runs on a Mac: each row's own blocks through pass 1 (its table past
    the shared blocks), the shared blocks of two sets (one a verified chunk's positions) as one
    MLX partial, all merged by pass 2 with sinks; against the float64 reference over the rows'
    whole tables. The planted fault, a shared part one token short, is caught."""
    from test_cascade_attention import cascade_case, faulty

    from metal_kernels.cascade import shared_prefix_partials

    rng = np.random.default_rng(7)
    whole, parts = cascade_case(rng, [97, 65, 300, 0, 81, 140, 113, 114, 115],
                                {(0, 1, 4, 5): 4, (6, 7, 8): 7}, num_kv_heads=2, group=4)
    suffix_tables, suffix_lens = parts[4:]
    whole = tuple(a.astype(dtype) if a.dtype == mx.float32 else a for a in whole)
    q, k_pool, v_pool, tables, context_lens = whole
    scale, sinks = q.shape[-1] ** -0.5, mx.array(rng.standard_normal(q.shape[1]).astype(np.float32))
    own_case = (q, k_pool, v_pool, suffix_tables, suffix_lens)
    first, _, o_own, ml_own, _, _ = emulate(own_case, scale, partitions=2)
    assert first.returncode == 0, first.stderr[-3000:]
    expected = reference(*whole, scale, sinks=sinks)
    for sets, fault in ((parts[:4], False), (faulty(parts, 0)[:4], True)):
        o_shared, ml_shared = shared_prefix_partials(q, k_pool, v_pool, *sets, scale)
        second, out = emulate_merge(np.concatenate([np.array(o_shared), o_own], axis=2),
                                    np.concatenate([np.array(ml_shared), ml_own], axis=2), dtype, sinks)
        assert second.returncode == 0, second.stderr[-3000:]
        gap = (np.abs(out - expected) / (1 + np.abs(expected))).max()
        # The shared part's scores come from an MLX matmul in the model's dtype (the kernel keeps
        # fp32): fp16 rounds them, so the kernel self-check's tolerance (relative to 1 + |want|)
        # applies, not pass 1's.
        assert gap > 1e-2 if fault else gap < SELF_CHECK_TOLERANCE[dtype], gap
