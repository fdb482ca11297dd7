"""Decode attention over the paged KV pool: the pure-MLX reference and the dispatch to Metal.

Each decode query is one token. Its keys and values are scattered over the pool in blocks of
``block_size`` tokens; ``block_tables[b]`` lists sequence ``b``'s blocks in order and
``context_lens[b]`` says how many of their slots hold real tokens. The reference gathers those
blocks into a dense ``[B, Hkv, MB * block_size, D]`` tensor and masks the tail; the Metal kernel
in ``metal_kernels/`` reads the blocks in place instead.
"""

from __future__ import annotations

import mlx.core as mx

from metal_kernels import paged_attention_metal


def paged_attention_reference(
    q: mx.array,
    k_pool: mx.array,
    v_pool: mx.array,
    block_tables: mx.array,
    context_lens: mx.array,
    scale: float,
) -> mx.array:
    """Attention of ``q[B, Hq, D]`` over each sequence's paged context; returns ``[B, Hq, D]``.

    ``k_pool``/``v_pool`` are ``[num_blocks, Hkv, block_size, D]``; ``Hq`` is a multiple of
    ``Hkv`` (GQA). Rows with ``context_lens == 0`` (padding) return zeros.
    """
    batch, max_blocks = block_tables.shape
    _, num_kv_heads, block_size, head_dim = k_pool.shape

    def gather(pool: mx.array) -> mx.array:
        # [B, MB, Hkv, BS, D] -> [B, Hkv, MB * BS, D]: one dense context per sequence.
        blocks = pool[block_tables]
        return blocks.transpose(0, 2, 1, 3, 4).reshape(
            batch, num_kv_heads, max_blocks * block_size, head_dim
        )

    keys, values = gather(k_pool), gather(v_pool)
    valid = mx.arange(max_blocks * block_size)[None, :] < context_lens[:, None]  # [B, N]
    out = mx.fast.scaled_dot_product_attention(
        q[:, :, None, :], keys, values, scale=scale, mask=valid[:, None, None, :]
    )[:, :, 0, :]
    # An all-masked row softmaxes to NaN; padding rows must stay harmless.
    return mx.where((context_lens > 0)[:, None, None], out, mx.zeros_like(out))


def paged_attention(
    q: mx.array,
    k_pool: mx.array,
    v_pool: mx.array,
    block_tables: mx.array,
    context_lens: mx.array,
    scale: float,
) -> mx.array:
    """Decode attention over the paged pool: the Metal kernel where it runs, else the reference.

    Same contract as :func:`paged_attention_reference`.
    """
    out = paged_attention_metal(q, k_pool, v_pool, block_tables, context_lens, scale)
    if out is not None:
        return out
    return paged_attention_reference(q, k_pool, v_pool, block_tables, context_lens, scale)
