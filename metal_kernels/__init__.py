"""pico-vllm's Metal paged-attention kernel (stub until the kernel lands)."""

from __future__ import annotations

import mlx.core as mx


def paged_attention_metal(
    q: mx.array,
    k_pool: mx.array,
    v_pool: mx.array,
    block_tables: mx.array,
    context_lens: mx.array,
    scale: float,
) -> mx.array | None:
    """Run the Metal kernel, or return ``None`` when it cannot run here (no Metal, unsupported
    shape, failed self-check) so the caller falls back to the pure-MLX reference."""
    return None
