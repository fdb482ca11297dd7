"""Cascade attention (FlashInfer's, Hydragen's): decode rows that share a prefix of blocks attend
to it once, together, and to their own blocks separately; the two partial softmaxes merge exactly.

Without it, each of ``R`` sequences sharing an ``S``-token prefix gathers and reads those ``S``
keys and values again: ``R`` matrix-vector products. With it the shared blocks are gathered once
and all ``R * G`` query heads (``G`` per KV head) are the rows of one matrix product over them
(:func:`shared_prefix_partials`; several such *sets* per step, each over its own blocks: the
requests behind each of several system prompts, or the verified positions of each sequence
checking drafts, which all read that sequence's blocks), while each row's own blocks -- its
block table from the first block past the prefix on -- go through the paged kernel as usual,
but stop at partials (pass 1). Partials carry each part's max score ``m`` and sum ``l``, so pass
2's merge (the same that merges a kernel's partitions) makes them one softmax, sinks included:
nothing approximated.

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
    q: mx.array, k_pool: mx.array, v_pool: mx.array, shared_tables: mx.array, set_rows: mx.array,
    set_lens: mx.array, row_slots: mx.array, scale: float, softcap: float | None = None,
) -> tuple[mx.array, mx.array]:
    """Each *set* of rows of ``q[B, Hq, D]`` over its shared blocks, as one partition per row:
    ``o[B, Hq, 1, D]``, ``ml[B, Hq, 1, 2]``.

    Set ``s`` reads the blocks ``shared_tables[s]`` (``[S, NS]``); its members are the rows
    ``set_rows[s]`` (``[S, R]``), member ``r`` reading the first ``set_lens[s, r]`` tokens (0: a
    padding slot). Row ``b``'s partition is slot ``row_slots[b]`` of the flattened ``[S * R]``
    slots, or ``S * R`` for a row in no set (``o = 0, l = 0``: it weighs nothing in the merge).
    Each set's blocks are gathered once for all its members, and their query heads are one
    matrix product's rows per KV head."""
    num_q_heads, head_dim = q.shape[1:]
    num_kv_heads, _, block_size, _ = k_pool.shape
    num_sets, num_blocks = shared_tables.shape
    slots, group = set_rows.shape[1], num_q_heads // num_kv_heads
    num_keys = num_blocks * block_size
    keys = k_pool[:, shared_tables].reshape(num_kv_heads, num_sets, num_keys, head_dim)
    values = v_pool[:, shared_tables].reshape(num_kv_heads, num_sets, num_keys, head_dim)
    # [S, R, Hq, D] -> [Hkv, S, R * G, D]: a set's members' query heads of a KV head, one matrix.
    queries = q[set_rows].reshape(num_sets, slots, num_kv_heads, group, head_dim)
    queries = queries.transpose(2, 0, 1, 3, 4).reshape(num_kv_heads, num_sets, slots * group, head_dim)
    lens = mx.repeat(set_lens, group, axis=1)  # [S, R * G]
    valid = mx.arange(num_keys)[None, None] < lens[..., None]
    o, m, l = partial_softmax(queries, keys, values, scale, valid[None], softcap)

    def per_row(parts: mx.array, outside: list[float]) -> mx.array:
        # [Hkv, S, R * G, X] -> the rows' [B, Hq, X], a row outside every set taking ``outside``.
        width = parts.shape[-1]
        parts = parts.reshape(num_kv_heads, num_sets, slots, group, width).transpose(1, 2, 0, 3, 4)
        parts = parts.reshape(num_sets * slots, num_q_heads, width)
        nothing = mx.broadcast_to(mx.array(outside, parts.dtype), (1, num_q_heads, width))
        return mx.concatenate([parts, nothing])[row_slots]

    o = per_row(o, [0.0] * head_dim)
    ml = per_row(mx.stack([m, l], axis=-1), [-float("inf"), 0.0])
    return o[:, :, None], ml[:, :, None]


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
