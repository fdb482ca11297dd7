"""Builds and launches the two paged-attention kernels: ``paged_attention.metal`` (pass 1,
per-partition partial softmaxes) and ``paged_attention_merge.metal`` (pass 2, the exact merge
of the partitions, written in the model's dtype).

How a launch is shaped is decided here, at run time, from the shapes of the step (``mx.compile``
traces one launch per decode bucket):

- **Partitions.** A threadgroup serves one (partition, KV head, sequence); at batch 1 a model
  has only a handful of KV heads (SmolLM2: 3), so without partitions a launch would be a dozen
  threadgroups on a GPU that runs hundreds. ``num_partitions`` splits each block table into up
  to ``MAX_PARTITIONS`` block-aligned partitions until the launch has ``TARGET_THREADGROUPS``
  threadgroups (several per GPU core, as MLX sizes its two-pass ``sdpa_vector``), but never
  fewer than one block per simdgroup.
- **Query heads per threadgroup.** All ``G`` query heads of a KV head share its K/V reads; each
  head costs a lane ``2 * D / 32`` registers, so a threadgroup takes ``GQ``, the largest divisor of
  ``G`` that keeps them under ``MAX_HEAD_REGISTERS`` floats, and ``G / GQ`` threadgroups share a
  KV head.
"""

from __future__ import annotations

import functools
from pathlib import Path

import mlx.core as mx

SOURCE_PATH = Path(__file__).with_name("paged_attention.metal")
MERGE_SOURCE_PATH = Path(__file__).with_name("paged_attention_merge.metal")
INPUT_NAMES = ["q", "k_pool", "v_pool", "block_tables", "context_lens", "scale", "blocks_per_part",
               "window", "softcap"]
MERGE_INPUT_NAMES = ["o_part", "ml_part", "sinks"]
OUTPUT_NAMES = ["o_part", "ml_part"]

HEAD_DIMS = (64, 80, 96, 128, 256)
BLOCK_SIZES = (8, 16, 32)
DTYPES = (mx.float16, mx.bfloat16, mx.float32)
NUM_SIMDGROUPS = 4  # per threadgroup
TARGET_THREADGROUPS = 512
MAX_PARTITIONS = 64
MAX_HEAD_REGISTERS = 32  # floats per lane for the q (and again the o) of a threadgroup's heads
THREADGROUP_MEMORY_LIMIT = 32 * 1024  # bytes, on every Apple GPU


def kernel_source(path: Path = SOURCE_PATH) -> str:
    """A kernel body MLX wraps (read from its ``.metal`` file)."""
    return path.read_text()


@functools.cache
def build_kernel(source: str | None = None, name: str = "pico_paged_attention"):
    """Pass 1's ``mx.fast.metal_kernel`` object (MLX compiles one pipeline per template instance)."""
    # Inputs are read through their strides: MLX need not copy a q that is a slice.
    return mx.fast.metal_kernel(name=name, input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
                                source=source or kernel_source(), ensure_row_contiguous=False)


@functools.cache
def build_merge_kernel(source: str | None = None, name: str = "pico_paged_attention_merge"):
    """Pass 2's ``mx.fast.metal_kernel`` object."""
    return mx.fast.metal_kernel(name=name, input_names=MERGE_INPUT_NAMES, output_names=["out"],
                                source=source or kernel_source(MERGE_SOURCE_PATH))


def threadgroup_bytes(head_dim: int, num_simdgroups: int = NUM_SIMDGROUPS) -> int:
    """Threadgroup memory of pass 1: tg_o[NSG * D] + tg_ml[NSG * 2] floats, whatever the group."""
    return 4 * num_simdgroups * (head_dim + 2)


def heads_per_threadgroup(group: int, head_dim: int) -> int:
    """``GQ``: the most query heads of one KV head a threadgroup serves within the register cap."""
    per_head = -(-head_dim // 32)
    return max(d for d in range(1, group + 1) if group % d == 0 and d * per_head <= MAX_HEAD_REGISTERS)


def num_partitions(batch: int, threadgroups_per_sequence: int, max_blocks: int) -> int:
    """Partitions per block table: enough threadgroups to fill the GPU, one block per simdgroup
    at least, ``MAX_PARTITIONS`` at most."""
    wanted = -(-TARGET_THREADGROUPS // max(1, batch * threadgroups_per_sequence))
    return max(1, min(wanted, MAX_PARTITIONS, -(-max_blocks // NUM_SIMDGROUPS)))


def unsupported_reason(q: mx.array, k_pool: mx.array, v_pool: mx.array, block_tables: mx.array,
                       context_lens: mx.array, sinks: mx.array | None = None) -> str | None:
    """Why the kernel cannot take these inputs, or None when it can."""
    _, num_q_heads, head_dim = q.shape
    num_kv_heads, _, block_size, _ = k_pool.shape
    if head_dim not in HEAD_DIMS:
        return f"head_dim {head_dim} (kernel supports {HEAD_DIMS})"
    if block_size not in BLOCK_SIZES:
        return f"block_size {block_size} (kernel supports {BLOCK_SIZES})"
    if q.dtype not in DTYPES or k_pool.dtype != q.dtype or v_pool.dtype != q.dtype:
        return f"dtypes q={q.dtype} k={k_pool.dtype} v={v_pool.dtype}"
    if v_pool.shape != k_pool.shape:
        return f"v_pool {v_pool.shape} is not shaped like k_pool {k_pool.shape}"
    if num_q_heads % num_kv_heads:
        return f"{num_q_heads} query heads do not split over {num_kv_heads} KV heads"
    if block_tables.dtype != mx.int32 or context_lens.dtype != mx.int32:
        return f"block_tables {block_tables.dtype} / context_lens {context_lens.dtype} (need int32)"
    if sinks is not None and sinks.shape != (num_q_heads,):
        return f"sinks {sinks.shape} (need one per query head, {num_q_heads})"
    return None


def instance(dtype: mx.Dtype, num_q_heads: int, num_kv_heads: int, head_dim: int,
             block_size: int) -> tuple:
    """What MLX compiles one pass-1 pipeline for (the self-check's unit)."""
    group = num_q_heads // num_kv_heads
    return (dtype, head_dim, block_size, heads_per_threadgroup(group, head_dim), NUM_SIMDGROUPS)


def blocks_to_read(block_tables: mx.array, block_size: int, window: int | None) -> int:
    """How many blocks of a table one query reads: the table's width, or at most the blocks a
    window of ``window`` tokens can touch."""
    width = block_tables.shape[1]
    return width if window is None else min(width, (window - 1) // block_size + 2)


def launch_config(q: mx.array, k_pool: mx.array, block_tables: mx.array,
                  partitions: int | None = None, window: int | None = None) -> dict:
    """Template, grid, output shapes and partition size of one pass-1 launch (MLX's grid counts
    threads). ``partitions`` overrides ``num_partitions`` (the tests walk 1 to 64)."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads, block_size = k_pool.shape[0], k_pool.shape[2]
    dtype, _, _, gq, nsg = instance(q.dtype, num_q_heads, num_kv_heads, head_dim, block_size)
    chunks = num_q_heads // num_kv_heads // gq
    max_blocks = blocks_to_read(block_tables, block_size, window)
    parts = partitions or num_partitions(batch, num_kv_heads * chunks, max_blocks)
    blocks_per_part = max(1, -(-max_blocks // parts))
    parts = max(1, -(-max_blocks // blocks_per_part))  # no partition left without a block
    return dict(
        template=[("T", dtype), ("D", head_dim), ("BS", block_size), ("GQ", gq), ("NSG", nsg)],
        grid=(parts * nsg * 32, num_kv_heads * chunks, batch),
        threadgroup=(nsg * 32, 1, 1),
        output_shapes=[(batch, num_q_heads, parts, head_dim), (batch, num_q_heads, parts, 2)],
        output_dtypes=[mx.float32, mx.float32],
        blocks_per_part=blocks_per_part,
    )


def paged_attention_partials(
    q, k_pool, v_pool, block_tables, context_lens, scale: float, *, window: int | None = None,
    softcap: float | None = None, partitions: int | None = None, kernel=None, verbose: bool = False,
) -> tuple[mx.array, mx.array]:
    """Pass 1: ``o_part[B, Hq, P, D]`` (normalized per partition), ``ml_part[B, Hq, P, 2]``."""
    config = launch_config(q, k_pool, block_tables, partitions, window)
    blocks_per_part = config.pop("blocks_per_part")
    inputs = [q, k_pool, v_pool, block_tables, context_lens, mx.array(scale, dtype=mx.float32),
              mx.array(blocks_per_part, dtype=mx.int32), mx.array(window or 0, dtype=mx.int32),
              mx.array(softcap or 0.0, dtype=mx.float32)]
    return tuple((kernel or build_kernel())(inputs=inputs, verbose=verbose, **config))


def merge_config(o_part: mx.array, dtype: mx.Dtype) -> dict:
    """One simdgroup per (sequence, query head)."""
    batch, num_q_heads, _, head_dim = o_part.shape
    return dict(template=[("T", dtype), ("D", head_dim)], grid=(32, num_q_heads, batch),
                threadgroup=(32, 1, 1), output_shapes=[(batch, num_q_heads, head_dim)],
                output_dtypes=[dtype])


def merge_partitions(o_part: mx.array, ml_part: mx.array, dtype: mx.Dtype, sinks: mx.array | None = None,
                     *, kernel=None, verbose: bool = False) -> mx.array:
    """Pass 2: ``[B, Hq, D]`` in ``dtype``, the exact merge (see the ``.metal`` header); ``sinks``
    (``[Hq]``) join the denominator."""
    config = merge_config(o_part, dtype)
    sinks = mx.full((o_part.shape[1],), -mx.inf) if sinks is None else sinks.astype(mx.float32)
    return (kernel or build_merge_kernel())(inputs=[o_part, ml_part, sinks], verbose=verbose, **config)[0]


def paged_attention_kernel(q, k_pool, v_pool, block_tables, context_lens, scale: float, *,
                           window: int | None = None, sinks: mx.array | None = None,
                           softcap: float | None = None):
    """Both passes; same contract as ``paged_attention_reference``, variants included."""
    o_part, ml_part = paged_attention_partials(q, k_pool, v_pool, block_tables, context_lens, scale,
                                               window=window, softcap=softcap)
    return merge_partitions(o_part, ml_part, q.dtype, sinks)
