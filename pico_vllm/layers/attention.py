"""Attention over a flat batch of tokens whose keys and values live in the paged KV pool.

One engine step runs one flat batch of ``T`` tokens from many sequences: first the *decode*
rows (one query token each: a sequence's next token, or one position of a sequence verifying
drafts, whose context ends at that position: causal within its chunk), then the *prefill
chunks* (several prompt tokens of one sequence). Every layer first writes the step's new K/V
into the pool **in place**, then

- decode tokens attend through :func:`metal_kernels.paged_attention` (the Metal kernel on a Mac,
  the pure-MLX reference elsewhere), or, when several share a prefix of blocks, through
  :func:`metal_kernels.cascade_attention` (the shared blocks read once for all of them), and
- each prefill chunk gathers its sequence's blocks (cached prefix + the chunk just written)
  and runs causal ``scaled_dot_product_attention``.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx

from metal_kernels import cascade_attention, paged_attention
from metal_kernels.reference import softmax_attention
from pico_vllm.layers.kv_cache import KVCache


class PrefillChunk(NamedTuple):
    """One multi-token chunk of a sequence in the flat batch."""

    query_start: int  # index of the chunk's first token in the flat batch
    query_len: int  # tokens in the chunk
    context_len: int  # tokens of this sequence in the pool after the step (prefix + chunk)
    block_table: mx.array  # [G, ceil(context_len / block_size)] int32, one row per layer group
    state_slot: int = 0  # a hybrid model's: the sequence's slot in the state pool


class SharedPrefix(NamedTuple):
    """Sets of decode rows whose block tables start with the same blocks (cascade attention;
    planned by ``engine/cascade.py``). Set ``s`` is the rows ``set_rows[s]``, member ``r`` reading
    ``set_lens[s, r]`` tokens of ``tables[:, s]`` (0: a padding slot); row ``b`` is slot
    ``row_slots[b]`` of the flattened sets (``S * R``: in none), and reads its own
    ``suffix_lens[b]`` tokens through ``suffix_tables[:, b]``, its table past the shared blocks."""

    tables: mx.array  # [G, S, NS] int32
    set_rows: mx.array  # [S, R] int32
    set_lens: mx.array  # [S, R] int32
    row_slots: mx.array  # [B] int32
    suffix_tables: mx.array  # [G, B, max_blocks] int32
    suffix_lens: mx.array  # [B] int32


class AttentionMetadata(NamedTuple):
    """Where the step's tokens go in the pool and what each of them attends to.

    The first ``B = block_tables.shape[1]`` tokens are single-token queries (decode steps, the
    positions of a verified chunk, or a prefill chunk of one token), in the rows of ``block_tables`` /
    ``context_lens``; the rest are the ``prefills``, in order. Blocks are per layer group
    (``KVCache.group``: the first axis, ``G``, of the block arrays). A tuple of arrays (and, for
    mixed steps, chunk records), so a decode step's metadata can cross into ``mx.compile``.
    """

    # Each new token's pool slot, as (block, offset) arrays: token i's K/V goes to
    # pool[:, slot_blocks[g, i], slot_offsets[i]] for the layers of group g. (vLLM's slot_mapping
    # = block * block_size + offset; split once per step here, so no layer has to.)
    slot_blocks: mx.array  # [G, T] int32
    slot_offsets: mx.array  # [T] int32
    block_tables: mx.array  # [G, B, max_blocks] int32; entries past a context are never read
    context_lens: mx.array  # [B] int32, the query token included; 0 marks a padding row
    prefills: tuple[PrefillChunk, ...] = ()
    shared_prefix: SharedPrefix | None = None  # decode rows sharing leading blocks, if any
    state_slots: mx.array | None = None  # [B] int32: a hybrid model's state-pool slot per decode row

    @property
    def num_decode_tokens(self) -> int:
        return self.block_tables.shape[1]


class AttentionVariant(NamedTuple):
    """How a layer's softmax attention departs from plain causal attention over all earlier
    tokens. ``FULL`` (all None) is Llama's attention."""

    window: int | None = None  # attend to the last ``window`` tokens only (the query's included)
    sinks: mx.array | None = None  # [Hq]: one extra logit per head in the denominator (gpt-oss)
    softcap: float | None = None  # scores become ``softcap * tanh(score / softcap)`` (Gemma 2)

    @property
    def is_full(self) -> bool:
        return all(value is None for value in self)


FULL = AttentionVariant()


def attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    cache: KVCache,
    layer: int,
    meta: AttentionMetadata,
    scale: float,
    variant: AttentionVariant = FULL,
) -> mx.array:
    """Write the step's ``k``/``v`` (``[T, Hkv, D]``) to the pool, then attend for ``q[T, Hq, D]``.

    Returns ``[T, Hq, D]``; ``q``/``k`` must already carry their rotary embedding.
    """
    cache.write(layer, k, v, meta)
    return attend(q, cache, layer, meta, scale, variant)


def attend(
    q: mx.array,
    cache: KVCache,
    layer: int,
    meta: AttentionMetadata,
    scale: float,
    variant: AttentionVariant = FULL,
) -> mx.array:
    """Attention of the step's queries ``q[T, Hq, D]`` over the pool (their own K/V already
    written): decode rows through :func:`metal_kernels.paged_attention`, then each prefill chunk."""
    k_pool, v_pool, group = cache.keys(layer), cache.values(layer), cache.group(layer)
    outputs = []
    shared = meta.shared_prefix
    if meta.num_decode_tokens and shared is not None and variant.window is None:
        outputs.append(
            cascade_attention(
                q[: meta.num_decode_tokens], k_pool, v_pool, shared.tables[group], shared.set_rows,
                shared.set_lens, shared.row_slots, shared.suffix_tables[group], shared.suffix_lens,
                scale, sinks=variant.sinks, softcap=variant.softcap,
            )
        )
    elif meta.num_decode_tokens:  # a window's start moves with each row: whole tables
        outputs.append(
            paged_attention(
                q[: meta.num_decode_tokens],
                k_pool,
                v_pool,
                meta.block_tables[group],
                meta.context_lens,
                scale,
                **variant._asdict(),
            )
        )
    for chunk in meta.prefills:
        outputs.append(_prefill_attention(q, k_pool, v_pool, chunk.block_table[group], chunk, scale, variant))
    return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=0)


def _prefill_attention(
    q: mx.array,
    k_pool: mx.array,
    v_pool: mx.array,
    block_table: mx.array,
    chunk: PrefillChunk,
    scale: float,
    variant: AttentionVariant,
) -> mx.array:
    """Causal attention of one chunk over its sequence's cached prefix plus itself (the
    ``block_table`` of the layer's group)."""
    num_kv_heads, _, block_size, head_dim = k_pool.shape
    first_query = chunk.context_len - chunk.query_len  # the chunk's first position
    # A window hides everything before the first query's window: those blocks are not gathered.
    first_block = 0
    if variant.window is not None:
        first_block = max(0, first_query - variant.window + 1) // block_size
    table = block_table[first_block:]
    first_key = first_block * block_size
    num_keys = chunk.context_len - first_key

    def gather(pool: mx.array) -> mx.array:
        # [Hkv, n, BS, D] -> [1, Hkv, n * BS, D] (a reshape: the pool is head-major), cut to
        # the sequence's real tokens.
        blocks = pool[:, table]
        return blocks.reshape(1, num_kv_heads, -1, head_dim)[:, :, :num_keys]

    queries = q[chunk.query_start : chunk.query_start + chunk.query_len]
    queries = queries.transpose(1, 0, 2)[None]  # [1, Hq, L, D]
    keys, values = gather(k_pool), gather(v_pool)
    if variant.is_full:
        # "causal" aligns the mask bottom-right: query i sees the prefix and chunk tokens <= i.
        mask = "causal"
    else:
        query_pos = mx.arange(first_query, chunk.context_len)[:, None]
        key_pos = mx.arange(first_key, chunk.context_len)[None]
        mask = key_pos <= query_pos
        if variant.window is not None:
            mask = mask & (key_pos > query_pos - variant.window)
    if variant.softcap is None:
        out = mx.fast.scaled_dot_product_attention(
            queries, keys, values, scale=scale, mask=mask, sinks=variant.sinks
        )
    else:
        group = queries.shape[1] // num_kv_heads
        grouped = queries.reshape(num_kv_heads, group, chunk.query_len, head_dim)
        sinks = None if variant.sinks is None else variant.sinks.reshape(num_kv_heads, group, 1, 1)
        out = softmax_attention(grouped, keys[0][:, None], values[0][:, None], scale, mask,
                                sinks=sinks, softcap=variant.softcap)
        out = out.reshape(queries.shape)
    return out[0].transpose(1, 0, 2)
