"""Turns one scheduled step into flat MLX arrays, runs the model, and samples.

The scheduler hands over ``(sequence, n)`` pairs: compute ``n`` more tokens of each sequence.
The runner lays them out as one flat batch of ``T`` tokens — single-token queries (decodes)
first, then multi-token prefill chunks — with, per token, its id, its position and the pool slot
its K/V goes to, and per sequence its block table and context length. One forward pass later,
the last position of every sequence whose known tokens are now all computed is sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from pico_vllm.config import CPU_KV_CACHE_BYTES, EngineConfig, on_metal
from pico_vllm.engine.scheduler import SchedulerOutput
from pico_vllm.engine.sequence import Sequence
from pico_vllm.layers.attention import AttentionMetadata, KVCache, PrefillChunk
from pico_vllm.layers.sampler import Sampler, SamplerOutput

# Fraction of the free Metal working set the KV pool may take (the rest: activations, MLX cache).
METAL_KV_FRACTION = 0.8


@dataclass
class StepResult:
    """What a step produced, aligned with ``SchedulerOutput.scheduled``."""

    sampled: list[int | None]  # the new token of each sequence that sampled, else None
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]


def kv_bytes_per_block(model: nn.Module, block_size: int, dtype: mx.Dtype) -> int:
    """Bytes one block takes across all layers, keys and values."""
    return 2 * model.num_layers * model.num_kv_heads * block_size * model.head_dim * dtype.size


def resolve_num_blocks(config: EngineConfig, model: nn.Module, dtype: mx.Dtype) -> int:
    """Blocks in the pool: ``config.num_blocks``, else the KV memory budget / bytes per block."""
    if config.num_blocks is not None:
        return config.num_blocks
    budget = config.kv_cache_bytes
    if budget is None and on_metal():
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        weights = sum(p.nbytes for _, p in nn.utils.tree_flatten(model.parameters()))
        budget = int((info["max_recommended_working_set_size"] - weights) * METAL_KV_FRACTION)
    if budget is None:
        budget = CPU_KV_CACHE_BYTES
    num_blocks = budget // kv_bytes_per_block(model, config.block_size, dtype)
    if num_blocks < 1:
        raise ValueError(f"KV memory budget of {budget} bytes holds no block of this model")
    return num_blocks


class ModelRunner:
    """Owns the model, the KV pool and the sampler; ``execute`` runs one scheduled step."""

    def __init__(self, model: nn.Module, config: EngineConfig, sampler: Sampler, dtype: mx.Dtype):
        assert config.num_blocks is not None, "resolve num_blocks before building the runner"
        self.model = model
        self.sampler = sampler
        self.block_size = config.block_size
        self.cache = KVCache(
            model.num_layers, config.num_blocks, model.num_kv_heads, config.block_size,
            model.head_dim, dtype,
        )

    def execute(self, out: SchedulerOutput) -> StepResult:
        """Run one step: write the new tokens' K/V into the pool and sample where due."""
        order = sorted(range(len(out.scheduled)), key=lambda i: out.scheduled[i][1] > 1)
        batch = [out.scheduled[i] for i in order]
        input_ids, positions, meta = self.prepare(batch)

        # A sequence samples once every token it knows has its K/V computed.
        sample_at, last_rows = [], []  # positions in `batch`, and their last token's row
        row = 0
        for position, (seq, n) in enumerate(batch):
            row += n
            if seq.num_computed_tokens + n == seq.num_tokens:
                sample_at.append(position)
                last_rows.append(row - 1)

        hidden = self.model(input_ids, positions, self.cache, meta)
        result = StepResult([None] * len(batch), [None] * len(batch), [None] * len(batch))
        if not sample_at:
            mx.eval(self.cache.state)  # a step of only mid-prompt chunks still fills the pool
            return result
        logits = self.model.compute_logits(hidden[mx.array(last_rows)]).astype(mx.float32)
        sampled: SamplerOutput = self.sampler(logits, [batch[p][0] for p in sample_at])
        mx.eval(self.cache.state)

        for k, position in enumerate(sample_at):  # back to the scheduler's order
            i = order[position]
            result.sampled[i] = sampled.token_ids[k]
            if sampled.logprobs is not None:
                result.logprobs[i] = sampled.logprobs[k]
            result.top_logprobs[i] = sampled.top_logprobs[k]
        return result

    def prepare(self, batch: list[tuple[Sequence, int]]) -> tuple[mx.array, mx.array, AttentionMetadata]:
        """Flat ``input_ids[T]``, ``positions[T]`` and the attention metadata of a step.

        ``batch`` must list single-token queries before multi-token chunks.
        """
        bs = self.block_size
        ids, pos, slot_blocks = [], [], []
        decode_tables, decode_lens, prefills = [], [], []
        start = 0
        for seq, n in batch:
            first = seq.num_computed_tokens
            positions = np.arange(first, first + n, dtype=np.int32)
            table = np.asarray(seq.block_table, dtype=np.int32)
            ids.append(np.asarray(seq.token_ids[first : first + n], dtype=np.int32))
            pos.append(positions)
            slot_blocks.append(table[positions // bs])
            context_len = first + n
            num_blocks = -(-context_len // bs)
            if n == 1:
                decode_tables.append(table[:num_blocks])
                decode_lens.append(context_len)
            else:
                prefills.append(
                    PrefillChunk(start, n, context_len, mx.array(table[:num_blocks]))
                )
            start += n

        max_blocks = max((len(t) for t in decode_tables), default=1)
        block_tables = np.zeros((len(decode_tables), max_blocks), dtype=np.int32)
        for row, table in enumerate(decode_tables):
            block_tables[row, : len(table)] = table
        meta = AttentionMetadata(
            slot_blocks=mx.array(np.concatenate(slot_blocks)[:, None]),
            slot_offsets=mx.array(np.concatenate(pos)[:, None] % bs),
            num_decode_tokens=len(decode_tables),
            block_tables=mx.array(block_tables),
            context_lens=mx.array(np.asarray(decode_lens, dtype=np.int32)),
            prefills=tuple(prefills),
        )
        return mx.array(np.concatenate(ids)), mx.array(np.concatenate(pos)), meta
