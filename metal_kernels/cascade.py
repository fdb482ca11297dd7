"""Cascade attention (FlashInfer's, Hydragen's): decode rows that share a prefix of blocks attend
to it once, together, and to their own blocks separately; the two partial softmaxes merge exactly.

Without it, each of ``R`` sequences sharing an ``S``-token prefix gathers and reads those ``S``
keys and values again: ``R`` matrix-vector products. With it the shared blocks are gathered once
and all ``R * G`` query heads (``G`` per KV head) are the rows of one matrix product over them
(:func:`shared_prefix_partials`), while each sequence's own blocks -- its block table from the
first block past the prefix on -- go through the paged kernel as usual, but stop at partials
(pass 1). Partials carry each part's max score ``m`` and sum ``l``, so pass 2's merge (the same
that merges a kernel's partitions) makes them one softmax, sinks included: nothing approximated.

Only the rows' block *ids* decide what is shared: equal ids are the same memory, so the cascade
is exact whatever made them equal (the prefix cache, ``n`` choices of one prompt).

This file holds the MLX pieces; :func:`metal_kernels.cascade_attention` puts them together with
the kernel's two passes.
"""

from __future__ import annotations

import mlx.core as mx

from metal_kernels.reference import gather_contexts, masked_scores


def partial_softmax(
    queries: mx.array, keys: mx.array, values: mx.array, scale: float, valid: mx.array,
    softcap: float | None = None,
) -> tuple[mx.array, mx.array, mx.array]:
    """Attention of ``queries[..., R, D]`` over ``keys``/``values[..., N, D]`` where ``valid``
    (broadcast to ``[..., R, N]``), stopped before the merge: ``(o, m, l)``, float32, with ``o``
    ``[..., R, D]`` already divided by ``l``, ``m`` the max score and ``l`` the sum of
    ``exp(score - m)``, both ``[..., R]``. A row with no valid key has ``o = 0, l = 0`` (and weighs
    nothing in a merge)."""
    scores = masked_scores(queries, keys, scale, valid, softcap)
    m = scores.max(axis=-1)
    m_safe = mx.where(mx.isinf(m), 0.0, m)  # rows with no key: exp(-inf - 0) = 0, not NaN
    p = mx.exp(scores - m_safe[..., None])
    l = p.sum(axis=-1)
    o = (p.astype(values.dtype) @ values).astype(mx.float32) / mx.maximum(l, 1e-30)[..., None]
    return o, m, l


def shared_prefix_partials(
    q: mx.array, k_pool: mx.array, v_pool: mx.array, shared_table: mx.array, shared_lens: mx.array,
    scale: float, softcap: float | None = None,
) -> tuple[mx.array, mx.array]:
    """Row ``b`` of ``q[B, Hq, D]`` over the first ``shared_lens[b]`` tokens of the blocks in
    ``shared_table[NS]`` (0: not in the cascade), as one partition: ``o[B, Hq, 1, D]``,
    ``ml[B, Hq, 1, 2]``. The blocks are gathered once for all rows, and the rows' query heads are
    one matrix product's rows per KV head."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads, _, block_size, _ = k_pool.shape
    group = num_q_heads // num_kv_heads
    num_slots = shared_table.shape[0] * block_size
    keys = k_pool[:, shared_table].reshape(num_kv_heads, num_slots, head_dim)
    values = v_pool[:, shared_table].reshape(num_kv_heads, num_slots, head_dim)
    # [B, Hq, D] -> [Hkv, B * G, D]: every row's query heads of a KV head, one matrix.
    queries = q.reshape(batch, num_kv_heads, group, head_dim).transpose(1, 0, 2, 3)
    queries = queries.reshape(num_kv_heads, batch * group, head_dim)
    valid = mx.arange(num_slots)[None, :] < mx.repeat(shared_lens, group)[:, None]  # [B * G, N]
    o, m, l = partial_softmax(queries, keys, values, scale, valid[None], softcap)
    o = o.reshape(num_kv_heads, batch, group, head_dim).transpose(1, 0, 2, 3).reshape(q.shape)
    ml = mx.stack([m, l], axis=-1).reshape(num_kv_heads, batch, group, 2).transpose(1, 0, 2, 3)
    return o[:, :, None], ml.reshape(batch, num_q_heads, 1, 2)


def paged_partials_reference(
    q: mx.array, k_pool: mx.array, v_pool: mx.array, block_tables: mx.array, context_lens: mx.array,
    scale: float, softcap: float | None = None,
) -> tuple[mx.array, mx.array]:
    """Pass 1's contract with one partition, in MLX: each row over its own paged context,
    ``(o[B, Hq, 1, D], ml[B, Hq, 1, 2])``."""
    queries, keys, values = gather_contexts(q, k_pool, v_pool, block_tables)
    num_slots, head_dim = keys.shape[2], keys.shape[3]
    valid = mx.arange(num_slots)[None, :] < mx.minimum(context_lens, num_slots)[:, None]  # [B, N]
    o, m, l = partial_softmax(queries, keys, values, scale, valid[None, :, None, :], softcap)
    ml = mx.stack([m, l], axis=-1)  # [Hkv, B, G, 2]
    return (o.transpose(1, 0, 2, 3).reshape(*q.shape[:2], 1, head_dim),
            ml.transpose(1, 0, 2, 3).reshape(*q.shape[:2], 1, 2))
