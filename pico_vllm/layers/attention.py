"""Attention over a flat batch of tokens whose keys and values live in the paged KV pool.

One engine step runs one flat batch of ``T`` tokens from many sequences: first the *decode*
tokens (one query token per sequence), then the *prefill chunks* (several prompt tokens of one
sequence). Every layer first writes the step's new K/V into the pool **in place**, then

- decode tokens attend through :func:`paged_attention` (the Metal kernel on a Mac), and
- each prefill chunk gathers its sequence's blocks (cached prefix + the chunk just written)
  and runs causal ``scaled_dot_product_attention``.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from pico_vllm.layers.paged_attention import paged_attention


@dataclass(frozen=True)
class PrefillChunk:
    """One multi-token chunk of a sequence in the flat batch."""

    query_start: int  # index of the chunk's first token in the flat batch
    query_len: int  # tokens in the chunk
    context_len: int  # tokens of this sequence in the pool after the step (prefix + chunk)
    block_table: mx.array  # [ceil(context_len / block_size)] int32


@dataclass(frozen=True)
class AttentionMetadata:
    """Where the step's tokens go in the pool and what each of them attends to.

    The first ``num_decode_tokens`` tokens are single-token queries (decode steps, or a
    prefill chunk of one token), one per sequence, in the rows of ``block_tables`` /
    ``context_lens``; the rest are the ``prefills``, in order.
    """

    # Each new token's pool slot, as (block, offset) columns [T, 1]: token i's K/V goes to
    # pool[slot_blocks[i], :, slot_offsets[i]]. (vLLM's slot_mapping = block * block_size + offset;
    # split once per step here, so no layer has to.)
    slot_blocks: mx.array
    slot_offsets: mx.array
    num_decode_tokens: int
    block_tables: mx.array  # [num_decode_tokens, max_blocks] int32, padded with 0
    context_lens: mx.array  # [num_decode_tokens] int32, the query token included
    prefills: tuple[PrefillChunk, ...] = ()


class KVCache:
    """The paged KV pool: per layer, ``k`` and ``v`` of shape ``[num_blocks, Hkv, block_size, D]``.

    The arrays are replaced (never copied) on every write: ``pool[idx] = kv`` makes MLX donate
    the old buffer to the scatter, so a step costs O(tokens written), not O(pool).
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        num_kv_heads: int,
        block_size: int,
        head_dim: int,
        dtype: mx.Dtype,
    ) -> None:
        shape = (num_blocks, num_kv_heads, block_size, head_dim)
        self.keys = [mx.zeros(shape, dtype) for _ in range(num_layers)]
        self.values = [mx.zeros(shape, dtype) for _ in range(num_layers)]
        self.block_size = block_size
        self._heads = mx.arange(num_kv_heads)[None, :]
        mx.eval(self.keys, self.values, self._heads)

    @property
    def state(self) -> list[mx.array]:
        """All pool arrays, for ``mx.eval`` / ``mx.compile`` state."""
        return self.keys + self.values

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)

    def write(self, layer: int, k: mx.array, v: mx.array, meta: AttentionMetadata) -> None:
        """Store ``k``/``v`` (``[T, Hkv, D]``) of the step's tokens at their slots."""
        # Three broadcast index arrays select [T, Hkv] rows of D values: an in-place scatter.
        index = (meta.slot_blocks, self._heads, meta.slot_offsets)
        self.keys[layer][index] = k
        self.values[layer][index] = v


def attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    cache: KVCache,
    layer: int,
    meta: AttentionMetadata,
    scale: float,
) -> mx.array:
    """Write the step's ``k``/``v`` (``[T, Hkv, D]``) to the pool, then attend for ``q[T, Hq, D]``.

    Returns ``[T, Hq, D]``; ``q``/``k`` must already carry their rotary embedding.
    """
    cache.write(layer, k, v, meta)
    k_pool, v_pool = cache.keys[layer], cache.values[layer]
    outputs = []
    if meta.num_decode_tokens:
        outputs.append(
            paged_attention(
                q[: meta.num_decode_tokens],
                k_pool,
                v_pool,
                meta.block_tables,
                meta.context_lens,
                scale,
            )
        )
    for chunk in meta.prefills:
        outputs.append(_prefill_attention(q, k_pool, v_pool, chunk, scale))
    return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=0)


def _prefill_attention(
    q: mx.array, k_pool: mx.array, v_pool: mx.array, chunk: PrefillChunk, scale: float
) -> mx.array:
    """Causal attention of one chunk over its sequence's cached prefix plus itself."""
    _, num_kv_heads, block_size, head_dim = k_pool.shape
    num_slots = chunk.block_table.shape[0] * block_size

    def gather(pool: mx.array) -> mx.array:
        # [n, Hkv, BS, D] -> [1, Hkv, n * BS, D], cut to the sequence's real tokens.
        blocks = pool[chunk.block_table].transpose(1, 0, 2, 3)
        return blocks.reshape(1, num_kv_heads, num_slots, head_dim)[:, :, : chunk.context_len]

    queries = q[chunk.query_start : chunk.query_start + chunk.query_len]
    queries = queries.transpose(1, 0, 2)[None]  # [1, Hq, L, D]
    # "causal" aligns the mask bottom-right: query i sees the prefix and chunk tokens <= i.
    out = mx.fast.scaled_dot_product_attention(
        queries, gather(k_pool), gather(v_pool), scale=scale, mask="causal"
    )
    return out[0].transpose(1, 0, 2)
