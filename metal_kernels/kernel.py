"""Builds and launches the paged-attention kernel in ``paged_attention.metal``.

Pass 1 is the Metal kernel (per-partition partial softmaxes); pass 2 merges the partitions in
MLX ops and is skipped when one partition covers every context.
"""

from __future__ import annotations

import functools
from pathlib import Path

import mlx.core as mx

SOURCE_PATH = Path(__file__).with_name("paged_attention.metal")
INPUT_NAMES = ["q", "k_pool", "v_pool", "block_tables", "context_lens", "scale"]
OUTPUT_NAMES = ["o_part", "ml_part"]

HEAD_DIMS = (64, 80, 96, 128, 256)
BLOCK_SIZES = (8, 16, 32)
DTYPES = (mx.float16, mx.bfloat16, mx.float32)
PARTITION_SIZE = 512  # tokens per threadgroup: long contexts split into several partitions
THREADGROUP_MEMORY_LIMIT = 32 * 1024  # bytes, on every Apple GPU


def kernel_source() -> str:
    """The kernel body MLX wraps (read from the ``.metal`` file)."""
    return SOURCE_PATH.read_text()


@functools.cache
def build_kernel(source: str | None = None, name: str = "pico_paged_attention"):
    """The ``mx.fast.metal_kernel`` object (MLX compiles one pipeline per template instance)."""
    return mx.fast.metal_kernel(
        name=name,
        input_names=INPUT_NAMES,
        output_names=OUTPUT_NAMES,
        source=source or kernel_source(),
    )


def threadgroup_bytes(num_simdgroups: int, group: int, head_dim: int) -> int:
    """Threadgroup memory of one instance: tg_o[NSG*G*D] + tg_m[NSG*G] + tg_l[NSG*G] floats."""
    return 4 * num_simdgroups * group * (head_dim + 2)


def num_simdgroups(group: int, head_dim: int) -> int:
    """As many simdgroups (up to 4) as threadgroup memory allows for the merge buffers."""
    for nsg in (4, 2, 1):
        if threadgroup_bytes(nsg, group, head_dim) <= THREADGROUP_MEMORY_LIMIT:
            return nsg
    raise ValueError(f"GQA group {group} x head_dim {head_dim} does not fit threadgroup memory")


def unsupported_reason(q: mx.array, k_pool: mx.array) -> str | None:
    """Why the kernel cannot take these shapes, or None when it can."""
    _, num_q_heads, head_dim = q.shape
    num_kv_heads, _, block_size, _ = k_pool.shape
    if head_dim not in HEAD_DIMS:
        return f"head_dim {head_dim} (kernel supports {HEAD_DIMS})"
    if block_size not in BLOCK_SIZES:
        return f"block_size {block_size} (kernel supports {BLOCK_SIZES})"
    if q.dtype not in DTYPES or k_pool.dtype != q.dtype:
        return f"dtypes q={q.dtype} kv={k_pool.dtype}"
    group = num_q_heads // num_kv_heads
    if threadgroup_bytes(1, group, head_dim) > THREADGROUP_MEMORY_LIMIT:
        return f"GQA group {group} with head_dim {head_dim} exceeds threadgroup memory"
    return None


def launch_config(
    q: mx.array, k_pool: mx.array, block_tables: mx.array, partition_size: int = PARTITION_SIZE
) -> dict:
    """Template, grid and output shapes of one launch (grid counts threads, as MLX wants)."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads, block_size = k_pool.shape[0], k_pool.shape[2]
    group = num_q_heads // num_kv_heads
    max_tokens = block_tables.shape[1] * block_size
    parts = max(1, -(-max_tokens // partition_size))
    nsg = num_simdgroups(group, head_dim)
    return dict(
        template=[("T", q.dtype), ("D", head_dim), ("BS", block_size), ("G", group),
                  ("NSG", nsg), ("PART", partition_size)],
        grid=(parts * nsg * 32, num_kv_heads, batch),
        threadgroup=(nsg * 32, 1, 1),
        output_shapes=[(batch, num_q_heads, parts, head_dim), (batch, num_q_heads, parts, 2)],
        output_dtypes=[mx.float32, mx.float32],
    )


def paged_attention_partials(
    q, k_pool, v_pool, block_tables, context_lens, scale: float, *,
    partition_size: int = PARTITION_SIZE, kernel=None, verbose: bool = False,
) -> tuple[mx.array, mx.array]:
    """Pass 1: ``o_part[B, Hq, P, D]`` (normalized per partition), ``ml_part[B, Hq, P, 2]``."""
    kernel = kernel or build_kernel()
    config = launch_config(q, k_pool, block_tables, partition_size)
    inputs = [q, k_pool, v_pool, block_tables, context_lens, mx.array(scale, dtype=mx.float32)]
    return tuple(kernel(inputs=inputs, verbose=verbose, **config))


def merge_partitions(o_part: mx.array, ml_part: mx.array) -> mx.array:
    """Pass 2: merge partial softmaxes exactly (see the ``.metal`` header for the math)."""
    if o_part.shape[2] == 1:
        return o_part[:, :, 0]
    m, l = ml_part[..., 0], ml_part[..., 1]
    m_all = mx.max(m, axis=-1, keepdims=True)
    m_all = mx.where(mx.isinf(m_all), 0.0, m_all)  # rows with no token at all
    w = mx.where(l > 0, l * mx.exp(m - m_all), 0.0)
    total = w.sum(axis=-1, keepdims=True)
    out = (o_part * w[..., None]).sum(axis=2)
    return out / mx.maximum(total, 1e-30)


def paged_attention_kernel(q, k_pool, v_pool, block_tables, context_lens, scale: float):
    """Both passes; same contract as ``paged_attention_reference``."""
    o_part, ml_part = paged_attention_partials(q, k_pool, v_pool, block_tables, context_lens, scale)
    return merge_partitions(o_part, ml_part).astype(q.dtype)
