"""The paged decode-attention contract, in pure MLX: what the Metal kernel must compute, and what
runs wherever the kernel does not (the CPU, unsupported shapes).

Each decode query is one token. Its keys and values are scattered over the pool in blocks of
``block_size`` tokens; ``block_tables[b]`` lists sequence ``b``'s blocks in order and
``context_lens[b]`` says how many of their slots hold real tokens.

The pool is laid out ``[Hkv, num_blocks, block_size, D]``: head-major, so gathering a sequence's
blocks, ``pool[:, block_tables]``, *is* its dense ``[Hkv, B, MB * block_size, D]`` context — a
reshape, no transpose copy — and GQA is a reshape of ``q``: ``G = Hq / Hkv`` query rows per KV
head and sequence, as "batch" ``[Hkv, B]`` of ``scaled_dot_product_attention``. On the CPU (SmolLM2
shapes, batch 32, contexts up to 375 tokens) this measured 10.5 ms a layer against 16.1 ms for
gathering ``[B, MB, Hkv, BS, D]`` blocks and transposing them, in one run; the gather itself is
~1/5 of it, the softmax's ``exp`` the largest single part.
"""

from __future__ import annotations

import mlx.core as mx


def paged_attention_reference(
    q: mx.array,
    k_pool: mx.array,
    v_pool: mx.array,
    block_tables: mx.array,
    context_lens: mx.array,
    scale: float,
    *,
    window: int | None = None,
    sinks: mx.array | None = None,
    softcap: float | None = None,
) -> mx.array:
    """Attention of ``q[B, Hq, D]`` over each sequence's paged context; returns ``[B, Hq, D]``.

    ``k_pool``/``v_pool`` are ``[Hkv, num_blocks, block_size, D]``; ``Hq`` is a multiple of
    ``Hkv`` (GQA). Rows with ``context_lens == 0`` (padding) return zeros. The query is its
    sequence's last token (position ``context_len - 1``); the variants (see
    :func:`softmax_attention`): ``window`` keeps only the last ``window`` keys, ``sinks[Hq]``
    adds one logit per head to the softmax's denominator, ``softcap`` bounds the scores.
    """
    num_kv_heads = k_pool.shape[0]
    group = q.shape[1] // num_kv_heads
    queries, keys, values = gather_contexts(q, k_pool, v_pool, block_tables)
    num_slots = keys.shape[2]
    # A context longer than its table (a caller's mistake) reads only the table's blocks, as the
    # kernel does: a window then ends at the table's end.
    context_lens = mx.minimum(context_lens, num_slots)
    # Slots past a context (block padding, the tail of its last block) are masked out.
    slots = mx.arange(num_slots)[None, :]
    valid = slots < context_lens[:, None]  # [B, N]
    if window is not None:
        valid = valid & (slots >= context_lens[:, None] - window)
    if sinks is None and softcap is None:
        out = mx.fast.scaled_dot_product_attention(
            queries, keys, values, scale=scale, mask=valid[None, :, None, :]
        )  # [Hkv, B, G, D]
    else:
        sinks = None if sinks is None else sinks.reshape(num_kv_heads, 1, group, 1)
        out = softmax_attention(queries, keys, values, scale, valid[None, :, None, :],
                                sinks=sinks, softcap=softcap)
    out = out.transpose(1, 0, 2, 3).reshape(q.shape)
    # An all-masked row softmaxes to NaN; padding rows must stay harmless.
    return mx.where((context_lens > 0)[:, None, None], out, 0.0).astype(q.dtype)


def gather_contexts(
    q: mx.array, k_pool: mx.array, v_pool: mx.array, block_tables: mx.array
) -> tuple[mx.array, mx.array, mx.array]:
    """Each row's blocks as dense ``keys``/``values[Hkv, B, MB * block_size, D]`` (a reshape of
    the gather: the pool is head-major) and ``q[B, Hq, D]`` as ``queries[Hkv, B, G, D]``: the
    ``G`` query heads sharing a KV head are one matmul's rows."""
    batch, max_blocks = block_tables.shape
    num_kv_heads, _, block_size, head_dim = k_pool.shape
    num_slots = max_blocks * block_size
    keys = k_pool[:, block_tables].reshape(num_kv_heads, batch, num_slots, head_dim)
    values = v_pool[:, block_tables].reshape(num_kv_heads, batch, num_slots, head_dim)
    queries = q.reshape(batch, num_kv_heads, q.shape[1] // num_kv_heads, head_dim).transpose(1, 0, 2, 3)
    return queries, keys, values


def masked_scores(
    queries: mx.array, keys: mx.array, scale: float, valid: mx.array, softcap: float | None = None
) -> mx.array:
    """``scale * q.k`` of ``queries[..., R, D]`` against ``keys[..., N, D]``, softcapped
    (``cap * tanh(s / cap)``) if asked, in float32, ``-inf`` where ``valid`` is False."""
    scores = (queries * scale) @ keys.swapaxes(-1, -2)
    if softcap is not None:
        scores = mx.tanh(scores / softcap) * softcap
    return mx.where(valid, scores.astype(mx.float32), -mx.inf)


def softmax_attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    scale: float,
    valid: mx.array,
    *,
    sinks: mx.array | None = None,
    softcap: float | None = None,
) -> mx.array:
    """Attention written out, for the variants ``scaled_dot_product_attention`` has no switch
    for. ``queries[..., R, D]`` against ``keys``/``values[..., N, D]``; ``valid`` (bool) and
    ``sinks`` broadcast to the scores ``[..., R, N]`` and ``[..., R, 1]``. The score of a key is
    ``s = scale * q.k``, with a softcap ``cap * tanh(s / cap)`` (Gemma 2); a sink is one more
    logit per query head that only adds to the softmax's denominator (gpt-oss). Softmax in fp32.
    """
    scores = masked_scores(queries, keys, scale, valid, softcap)
    if sinks is not None:
        sink = mx.broadcast_to(sinks.astype(mx.float32), (*scores.shape[:-1], 1))
        scores = mx.concatenate([scores, sink], axis=-1)
    probs = mx.softmax(scores, axis=-1)
    if sinks is not None:
        probs = probs[..., :-1]
    # A row with no valid key (a padding row) softmaxes to NaN: the caller zeroes it.
    return (probs.astype(values.dtype) @ values).astype(queries.dtype)


def merge_partitions_reference(
    o_part: mx.array, ml_part: mx.array, sinks: mx.array | None = None
) -> mx.array:
    """Pass 2's contract in MLX ops: partial softmaxes ``o_part[B, Hq, P, D]`` (each divided by
    its own sum) with ``ml_part[B, Hq, P, 2]`` = (max score m, sum l) merge exactly into
    ``[B, Hq, D]`` float32: ``M = max_p m_p``, ``w_p = l_p exp(m_p - M)``,
    ``out = sum_p w_p o_p / sum_p w_p``; a row without tokens (every ``l_p`` 0) is zeros. A sink
    ``sinks[Hq]`` is one more logit without a value: ``M`` covers it and ``exp(s - M)`` joins the
    denominator only."""
    m, l = ml_part[..., 0], ml_part[..., 1]
    m_all = mx.max(m, axis=-1, keepdims=True)
    if sinks is not None:
        sink = sinks.astype(mx.float32)[None, :, None]
        m_all = mx.maximum(m_all, sink)
    m_all = mx.where(mx.isinf(m_all), 0.0, m_all)  # rows with no token at all
    w = mx.where(l > 0, l * mx.exp(m - m_all), 0.0)
    total = w.sum(axis=-1, keepdims=True)
    if sinks is not None:
        total = total + mx.exp(sink - m_all)
    return (o_part * w[..., None]).sum(axis=2) / mx.maximum(total, 1e-30)
